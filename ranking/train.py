"""Training the fused ranker: sampled negatives, early stopping on the validation period.

Each training query (a user right after a trigger, see :mod:`ranking.data`) gives up to
``positives`` items of the user's next event group and ``negatives`` others: half drawn
uniformly from the catalogue (the full-catalogue evaluation ranks against all of them),
half from the items the online candidate sources would bring (co-visitation, trending,
retrieval) -- the hard ones the ranker actually has to order.  The loss is a sampled
softmax: each positive against the query's negatives.  After every epoch NDCG@10 is
measured on (a fixed sample of) the validation period over the full catalogue; the
best epoch's weights are kept and training stops after ``patience`` epochs without gain.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor
from tqdm import tqdm

from ranking.data import Dataset, Period, Query
from ranking.evaluate import F32, Metrics, evaluate_scorer, sample_queries
from ranking.model import N_MODEL_SIGNALS, FusedRanker, RankerConfig, choose_device, repeat_signals

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOptions:
    """How to train: the model's shape is its :class:`RankerConfig` (``n_items`` is set
    from the dataset), the rest is sampling, optimisation and early stopping."""

    model: RankerConfig = field(default_factory=RankerConfig)
    positives: int = 4
    negatives: int = 64
    batch: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    max_epochs: int = 30
    patience: int = 2
    valid_queries: int = 300
    seed: int = 7


@dataclass
class Tables:
    """Per-item tensors the model reads: BERT rows, text flags, behavioural rows."""

    text: Tensor  # [I, 384]
    has_text: Tensor  # [I] bool
    rows: Tensor  # [I] long, 0 = no behavioural vector (item unseen in training)

    @classmethod
    def build(cls, ds: Dataset, use_text: bool = True) -> Tables:
        seen = np.zeros(len(ds.catalogue), np.bool_)
        seen[ds.events.item[ds.events.ts < ds.cut_ts[0]]] = True
        rows = np.where(seen, np.arange(len(ds.catalogue)) + 1, 0)
        text = torch.from_numpy(ds.item_emb)
        has = torch.from_numpy(ds.catalogue.has_text)
        if not use_text:
            text, has = torch.zeros_like(text), torch.zeros_like(has)
        return cls(text, has, torch.from_numpy(rows).long())


def history_tensors(queries: Sequence[Query], tables: Tables, h: int) -> dict[str, Tensor]:
    """The user side of the model's input, padded to ``h`` (at least one slot)."""
    b = len(queries)
    items = torch.zeros(b, h, dtype=torch.long)
    types = torch.zeros(b, h, dtype=torch.long)
    ages = torch.zeros(b, h)
    valid = torch.zeros(b, h, dtype=torch.bool)
    for r, q in enumerate(queries):
        k = min(h, q.hist_items.size)
        items[r, :k] = torch.from_numpy(q.hist_items[:k])
        types[r, :k] = torch.from_numpy(q.hist_types[:k].astype(np.int64))
        ages[r, :k] = torch.from_numpy(q.hist_age_s[:k])
        valid[r, :k] = True
    user = torch.from_numpy(np.stack([q.user_emb for q in queries]))
    return {
        "user_emb": user,
        "query_emb": torch.zeros_like(user),
        "hist_text": tables.text[items] * valid.unsqueeze(-1),
        "hist_has_text": tables.has_text[items] & valid,
        "hist_rows": tables.rows[items] * valid,
        "hist_types": types,
        "hist_age_s": ages,
    }


def candidate_tensors(cands: Tensor, signals: Tensor, tables: Tables) -> dict[str, Tensor]:
    return {
        "cand_text": tables.text[cands],
        "cand_has_text": tables.has_text[cands],
        "cand_rows": tables.rows[cands],
        "signals": signals,
    }


def _inputs(
    hist: dict[str, Tensor], cand: dict[str, Tensor], device: torch.device, dtype: torch.dtype
) -> dict[str, Tensor]:
    out = {}
    for k, v in (hist | cand).items():
        v = v.to(device)
        out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


class FusedScorer:
    """Full-catalogue scores from a :class:`FusedRanker` (evaluation)."""

    def __init__(self, model: FusedRanker, tables: Tables, h: int, chunk: int = 4096) -> None:
        self.model, self.tables, self.h, self.chunk = model, tables, h, chunk
        self.device, self.dtype = choose_device()

    @torch.inference_mode()
    def __call__(self, queries: Sequence[Query]) -> F32:
        self.model.eval()
        n_items = self.tables.text.shape[0]
        hist = history_tensors(queries, self.tables, self.h)
        sig = torch.from_numpy(np.stack([_dense_signals(q, n_items, self.h) for q in queries]))
        out = np.zeros((len(queries), n_items), np.float32)
        for s in range(0, n_items, self.chunk):
            cands = torch.arange(s, min(n_items, s + self.chunk)).unsqueeze(0)
            cand = candidate_tensors(cands, sig[:, s : s + self.chunk], self.tables)
            logits = self.model(**_inputs(hist, cand, self.device, self.dtype))
            out[:, s : s + self.chunk] = logits.float().cpu().numpy()
        return out


def _sample_candidates(
    q: Query, cfg: TrainOptions, n_items: int, rng: np.random.Generator
) -> tuple[list[int], list[int]] | None:
    blocked = q.blocked()
    pos = [t for t in q.targets if t not in blocked]
    if not pos:
        return None
    if len(pos) > cfg.positives:
        pos = [int(x) for x in rng.choice(pos, cfg.positives, replace=False)]
    exclude = set(q.targets) | blocked
    hard_pool = [k for k in q.sparse_signals()[0].tolist() if k not in exclude]
    n_hard = min(len(hard_pool), cfg.negatives // 2)
    negs = [int(x) for x in rng.choice(hard_pool, n_hard, replace=False)] if n_hard else []
    while len(negs) < cfg.negatives:
        for x in rng.integers(0, n_items, cfg.negatives).tolist():
            if x not in exclude and len(negs) < cfg.negatives:
                negs.append(x)
    return pos, negs


def _train_batch(
    queries: Sequence[Query], cfg: TrainOptions, tables: Tables, rng: np.random.Generator
) -> tuple[dict[str, Tensor], Tensor] | None:
    picked: list[tuple[Query, list[int], list[int]]] = []
    n_items = tables.text.shape[0]
    for q in queries:
        s = _sample_candidates(q, cfg, n_items, rng)
        if s is not None:
            picked.append((q, *s))
    if not picked:
        return None
    p, k = cfg.positives, cfg.negatives
    cands = torch.zeros(len(picked), p + k, dtype=torch.long)
    pos_mask = torch.zeros(len(picked), p, dtype=torch.bool)
    sig = torch.zeros(len(picked), p + k, N_MODEL_SIGNALS)
    for r, (q, pos, negs) in enumerate(picked):
        cands[r, : len(pos)] = torch.tensor(pos)
        pos_mask[r, : len(pos)] = True
        cands[r, p:] = torch.tensor(negs)
        items = cands[r].tolist()
        for c, item in enumerate(items):
            sig[r, c, 0] = q.covis.get(item, 0.0)
            sig[r, c, 1] = q.popularity.get(item, 0.0)
            sig[r, c, 2] = q.retrieval.get(item, 0.0)
        h = cfg.model.history_len
        sig[r, :, 3:] = torch.from_numpy(
            repeat_signals(q.hist_items[:h].tolist(), q.hist_age_s[:h].tolist(), items)
        )
    hist = history_tensors([q for q, _, _ in picked], tables, cfg.model.history_len)
    return hist | candidate_tensors(cands, sig, tables), pos_mask


def _dense_signals(q: Query, n_items: int, h: int) -> F32:
    """``[n_items, N_MODEL_SIGNALS]``: the online signals and the repeat signals of every item."""
    out = np.zeros((n_items, N_MODEL_SIGNALS), np.float32)
    out[:, :3] = q.dense_signals(n_items)
    seen = list(dict.fromkeys(q.hist_items[:h].tolist()))
    if seen:
        out[seen, 3:] = repeat_signals(q.hist_items[:h].tolist(), q.hist_age_s[:h].tolist(), seen)
    return out


def sampled_softmax_loss(logits: Tensor, pos_mask: Tensor) -> Tensor:
    """Mean over real positives of ``-log softmax(pos, negatives)``."""
    p = pos_mask.shape[1]
    pos, neg = logits[:, :p], logits[:, p:]
    neg_lse = torch.logsumexp(neg, dim=1, keepdim=True)
    per = -pos + torch.logaddexp(pos, neg_lse)
    return per[pos_mask].mean()


def train_fused(
    ds: Dataset, cfg: TrainOptions, progress: bool = True
) -> tuple[FusedRanker, Tables, dict[str, Any]]:
    """Train on the training period; returns the best model on validation and a report."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device, dtype = choose_device()
    rc = replace(cfg.model, n_items=len(ds.catalogue))
    tables = Tables.build(ds, rc.use_text)
    model = FusedRanker(rc).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    train = ds.period(Period.TRAIN)
    valid = sample_queries(ds.period(Period.VALID), cfg.valid_queries, cfg.seed)
    scorer = FusedScorer(model, tables, rc.history_len)
    best: tuple[float, int, dict[str, Tensor]] = (-1.0, -1, {})
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")
    for epoch in range(cfg.max_epochs):
        model.train()
        order = rng.permutation(len(train))
        total, steps = 0.0, 0
        bar = tqdm(
            range(0, len(order), cfg.batch),
            desc=f"fused epoch {epoch}",
            disable=not progress,
            leave=False,
        )
        for s in bar:
            made = _train_batch([train[i] for i in order[s : s + cfg.batch]], cfg, tables, rng)
            if made is None:
                continue
            inputs, pos_mask = made
            with autocast:
                logits = model(**{k: v.to(device) for k, v in inputs.items()})
            loss = sampled_softmax_loss(logits.float(), pos_mask.to(device))
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            total += float(loss.detach())
            steps += 1
            bar.set_postfix(loss=f"{total / steps:.3f}")
        m: Metrics = evaluate_scorer(scorer, valid, progress=False)
        history.append(
            {"epoch": epoch, "loss": round(total / max(steps, 1), 4), "valid_ndcg@10": m.ndcg}
        )
        log.info(
            "fused epoch %d loss %.4f valid ndcg@10 %.4f", epoch, total / max(steps, 1), m.ndcg
        )
        if m.ndcg > best[0]:
            best = (m.ndcg, epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
        elif epoch - best[1] >= cfg.patience:
            break
    model.load_state_dict(best[2])
    report: dict[str, Any] = {
        "dataset": ds.name,
        "config": {k: v for k, v in asdict(cfg).items() if k != "model"},  # shape: "model"
        "model": rc.to_dict(),
        "device": str(device),
        "best_epoch": best[1],
        "valid_ndcg@10": round(best[0], 4),
        "train_queries": len(train),
        "valid_queries": len(valid),
        "seconds": round(time.perf_counter() - t0, 1),
        "history": history,
    }
    return model, tables, report


def behavioural_ids(ds: Dataset, tables: Tables) -> list[str]:
    """Item id of each behavioural row (row 0 = unknown), for the serving artefact."""
    ids = [""] * (len(ds.catalogue) + 1)
    rows: npt.NDArray[np.int64] = tables.rows.numpy()
    for item, row in enumerate(rows.tolist()):
        if row:
            ids[row] = ds.catalogue.ids[item]
    return ids
