"""The baselines the fused ranker must beat, each a :data:`ranking.evaluate.Scorer`.

* popularity -- event-weighted item counts over a window before the trigger; the window
  (1 h, 1 day, 7 days, everything) is chosen on the validation period;
* co-visitation -- the online definition (pairs within 24 h, the user's three latest
  distinct items as sources) with 200 neighbours per source instead of the online 20,
  ties broken by popularity;
* repeat -- the user's own past: event-weighted counts of each item in everything the
  user did before the trigger, halved every half-life (none, 7, 30 or 180 days, chosen on
  the validation period), ties broken by popularity.  Wholesale customers re-order: on
  UCI 44% of the test positives are items the customer had bought before (9% are in the
  latest 50 events the feature store keeps);
* embedding -- cosine between the rolling user embedding and each item's BERT vector;
* SASRec -- a causal self-attention model over item ids, trained with cross-entropy over
  the full catalogue on the same training period, early-stopped on validation.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ranking.data import Dataset, Period, Query
from ranking.evaluate import F32, Metrics, Scorer, evaluate_scorer
from shoprec.errors import Interrupted
from shoprec.events import EVENT_WEIGHTS, EventType, event_code

log = logging.getLogger(__name__)
Option = TypeVar("Option")
Chosen = TypeVar("Chosen", bound=Scorer)

POP_WINDOWS_MS: dict[str, int | None] = {
    "1h": 3_600_000,
    "1d": 86_400_000,
    "7d": 7 * 86_400_000,
    "all": None,
}


class Popularity:
    def __init__(self, ds: Dataset, window_ms: int | None) -> None:
        self.ts = ds.events.ts
        self.items = ds.events.item
        weights = np.zeros(len(EventType), np.float32)
        for name, weight in EVENT_WEIGHTS.items():
            weights[event_code(name)] = weight
        self.w = weights[ds.events.type]
        self.n = len(ds.catalogue)
        self.window = window_ms

    def counts(self, q: Query) -> F32:
        hi = q.seen  # the events replayed so far: never a later one of the same timestamp
        lo = 0 if self.window is None else int(np.searchsorted(self.ts, q.trigger_ts - self.window))
        out: F32 = np.bincount(self.items[lo:hi], weights=self.w[lo:hi], minlength=self.n).astype(
            np.float32
        )
        return out

    def __call__(self, queries: Sequence[Query]) -> F32:
        return np.stack([self.counts(q) for q in queries])

    def tie_break(self, queries: Sequence[Query]) -> F32:
        """Popularity scaled far below one unit of another baseline's score (a decayed
        co-visit, one event of the user's), so that it only breaks that baseline's ties."""
        pop = self(queries)
        out: F32 = (1e-6 * pop / (pop.max(axis=1, keepdims=True) + 1.0)).astype(np.float32)
        return out


def best_on_validation(
    label: str, options: dict[str, Option], make: Callable[[Option], Chosen], valid: Sequence[Query]
) -> tuple[Chosen, str]:
    """The scorer ``make(option)`` that ranks ``valid`` best, and its option's name (the
    first of equals)."""
    best: tuple[float, str] | None = None
    for name, option in options.items():
        m = evaluate_scorer(make(option), valid, progress=False)
        log.info("%s %s: valid ndcg@10 %.4f", label, name, m.ndcg)
        if best is None or m.ndcg > best[0]:
            best = (m.ndcg, name)
    assert best is not None, "no options"
    return make(options[best[1]]), best[1]


class CoVisitation:
    def __init__(self, ds: Dataset, popularity: Popularity) -> None:
        self.n = len(ds.catalogue)
        self.pop = popularity

    def __call__(self, queries: Sequence[Query]) -> F32:
        out = self.pop.tie_break(queries)
        for row, q in enumerate(queries):
            keys, vals = q.covis_wide
            out[row, keys] += vals
        return out


REPEAT_HALF_LIVES_MS: dict[str, int | None] = {
    "none": None,
    "7d": 7 * 86_400_000,
    "30d": 30 * 86_400_000,
    "180d": 180 * 86_400_000,
}


class Repeat:
    """Each item's event-weighted count in the user's whole past before the trigger."""

    def __init__(self, ds: Dataset, popularity: Popularity, half_life_ms: int | None) -> None:
        ev = ds.events
        self.n = len(ds.catalogue)
        self.pop = popularity
        self.half_life = half_life_ms
        # Each user's events in replay order, found by binary search on the user number.
        self.order = np.argsort(ev.user, kind="stable")
        self.starts = np.searchsorted(ev.user[self.order], np.arange(ev.n_users + 1))
        self.ts, self.items, self.w = ev.ts, ev.item, popularity.w

    def counts(self, q: Query) -> F32:
        idx = self.order[self.starts[q.user] : self.starts[q.user + 1]]
        idx = idx[idx < q.seen]  # what the state had taken (one-event steps: not the label)
        w = self.w[idx].astype(np.float64)
        if self.half_life is not None:
            w = w * np.exp2((self.ts[idx] - q.trigger_ts) / self.half_life)
        out: F32 = np.bincount(self.items[idx], weights=w, minlength=self.n).astype(np.float32)
        return out

    def __call__(self, queries: Sequence[Query]) -> F32:
        return self.pop.tie_break(queries) + np.stack([self.counts(q) for q in queries])


class Embedding:
    def __init__(self, ds: Dataset) -> None:
        self.emb = ds.item_emb

    def __call__(self, queries: Sequence[Query]) -> F32:
        users = np.stack([q.user_emb for q in queries])
        out: F32 = np.asarray(users @ self.emb.T, dtype=np.float32)
        return out


# --- SASRec ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SASRecConfig:
    d: int = 64
    layers: int = 2
    heads: int = 2
    dropout: float = 0.2
    max_len: int = 50
    lr: float = 2e-3
    batch: int = 128
    max_epochs: int = 30
    patience: int = 3
    seed: int = 7
    max_seconds: float = 0.0
    """Stop after the epoch that crosses this much training time (0 = no limit)."""


class SASRec(nn.Module):
    """Kang & McAuley (2018): causal transformer over item ids, tied output embeddings."""

    def __init__(self, n_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item = nn.Embedding(n_items + 1, cfg.d, padding_idx=0)
        self.pos = nn.Embedding(cfg.max_len, cfg.d)
        # Scaled so that tied output logits start near unit variance (N(0, 1) rows
        # give logits of std ~sqrt(d) and a first loss of ~35 nats).
        nn.init.normal_(self.item.weight, std=cfg.d**-0.5)
        nn.init.normal_(self.pos.weight, std=0.02)
        with torch.no_grad():
            self.item.weight[0].zero_()
        layer = nn.TransformerEncoderLayer(
            cfg.d, cfg.heads, 2 * cfg.d, cfg.dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d)
        self.drop = nn.Dropout(cfg.dropout)

    def hidden(self, seq: Tensor) -> Tensor:
        """``seq`` ``[B, L]`` of item rows (0 = padding, left-padded), oldest first."""
        length = seq.shape[1]
        x = self.item(seq) * self.cfg.d**0.5 + self.pos(torch.arange(length, device=seq.device))
        # Padding is zeroed rather than key-masked, as in the reference implementation:
        # left padding plus a causal mask would leave fully masked rows (NaN in eval).
        x = x * (seq > 0).unsqueeze(-1)
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=seq.device), 1)
        h = self.encoder(self.drop(x), mask=causal, is_causal=True)
        out: Tensor = self.norm(h)
        return out

    def logits(self, h: Tensor) -> Tensor:
        return h @ self.item.weight[1:].T


def _sequences(ds: Dataset, end_ts: int, max_len: int) -> tuple[Tensor, Tensor]:
    """Training windows (inputs, next-item targets) from each user's events before ``end_ts``."""
    ev = ds.events
    keep = ev.ts < end_ts
    by_user: dict[int, list[int]] = {}
    for u, i in zip(ev.user[keep].tolist(), ev.item[keep].tolist(), strict=True):
        by_user.setdefault(u, []).append(i + 1)
    xs: list[list[int]] = []
    ys: list[list[int]] = []
    for seq in by_user.values():
        for stop in range(len(seq), 1, -max_len):
            start = max(0, stop - max_len - 1)
            window = seq[start:stop]
            x, y = window[:-1], window[1:]
            pad = max_len - len(x)
            xs.append([0] * pad + x)
            ys.append([0] * pad + y)
    return torch.tensor(xs, dtype=torch.long), torch.tensor(ys, dtype=torch.long)


def _query_input(queries: Sequence[Query], max_len: int) -> Tensor:
    out = torch.zeros(len(queries), max_len, dtype=torch.long)
    for r, q in enumerate(queries):
        items = q.hist_items[:max_len][::-1] + 1
        if items.size:
            out[r, max_len - items.size :] = torch.from_numpy(items.copy())
    return out


class SASRecScorer:
    def __init__(self, model: SASRec) -> None:
        self.model = model

    @torch.inference_mode()
    def __call__(self, queries: Sequence[Query]) -> F32:
        self.model.eval()
        h = self.model.hidden(_query_input(queries, self.model.cfg.max_len))[:, -1]
        out: F32 = self.model.logits(h).float().numpy()
        return out


def train_sasrec(
    ds: Dataset,
    valid: Sequence[Query],
    cfg: SASRecConfig,
    progress: bool = True,
    stop: threading.Event | None = None,
) -> tuple[SASRecScorer, dict[str, object]]:
    """SASRec on the training period, the best epoch on ``valid`` (``stop``: as
    :func:`ranking.train.train_fused`)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    x, y = _sequences(ds, ds.cut_ts[0], cfg.max_len)
    model = SASRec(len(ds.catalogue), cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    scorer = SASRecScorer(model)
    best = (-1.0, 0, model.state_dict())
    history: list[dict[str, float]] = []
    stopped_by_budget = False
    t0 = time.perf_counter()
    for epoch in range(cfg.max_epochs):
        model.train()
        order = rng.permutation(len(x))
        total = 0.0
        for s in tqdm(
            range(0, len(order), cfg.batch),
            desc=f"SASRec epoch {epoch}",
            disable=not progress,
            leave=False,
        ):
            Interrupted.check(stop, f"training SASRec (epoch {epoch})")
            idx = torch.from_numpy(order[s : s + cfg.batch])
            xb, yb = x[idx], y[idx]
            h = model.hidden(xb)
            mask = yb > 0
            loss = F.cross_entropy(model.logits(h[mask]), yb[mask] - 1)
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            total += float(loss.detach()) * len(idx)
        m: Metrics = evaluate_scorer(scorer, valid, progress=False)
        history.append({"epoch": epoch, "loss": total / len(order), "valid_ndcg@10": m.ndcg})
        log.info("SASRec epoch %d loss %.4f valid ndcg@10 %.4f", epoch, total / len(order), m.ndcg)
        if m.ndcg > best[0]:
            best = (m.ndcg, epoch, {k: v.clone() for k, v in model.state_dict().items()})
        elif epoch - best[1] >= cfg.patience:
            break
        if cfg.max_seconds and time.perf_counter() - t0 > cfg.max_seconds:
            log.warning("SASRec stopped by its time budget after epoch %d", epoch)
            stopped_by_budget = True
            break
    model.load_state_dict(best[2])
    info: dict[str, object] = {
        "best_epoch": best[1],
        "valid_ndcg@10": best[0],
        "train_windows": len(x),
        "epochs_run": len(history),
        "stopped_by_time_budget": stopped_by_budget,
        "seconds": round(time.perf_counter() - t0, 1),
        "history": history,
    }
    return scorer, info


def baseline_scorers(
    ds: Dataset, valid: Sequence[Query]
) -> tuple[dict[str, Scorer], dict[str, object]]:
    """The non-learned baselines, with the popularity window and the repeat half-life
    chosen on ``valid``."""
    pop, window = best_on_validation(
        "popularity window", POP_WINDOWS_MS, lambda w: Popularity(ds, w), valid
    )
    repeat, half_life = best_on_validation(
        "repeat half-life", REPEAT_HALF_LIVES_MS, lambda h: Repeat(ds, pop, h), valid
    )
    scorers: dict[str, Scorer] = {
        "popularity": pop,
        "covisitation": CoVisitation(ds, pop),
        "repeat": repeat,
        "embedding": Embedding(ds),
    }
    return scorers, {"popularity_window": window, "repeat_half_life": half_life}


__all__ = ["Period", "SASRec", "SASRecConfig", "baseline_scorers", "train_sasrec"]
