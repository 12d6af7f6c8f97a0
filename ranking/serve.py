"""Scoring a :class:`RankBatch` with the trained ranker: what Triton's ``fused_ranker`` v2 runs.

Same request contract as v1 (``ranking.fusion``).  Ids become model inputs here: BERT
vectors from the Redis-fed :class:`ItemTable`, behavioural rows from the artefact's own
id list (items unseen in training get row 0 and rank from text and signals).  The score
is the trained model's logit; ``REASONS`` and ``HISTORY_MATCH`` (the explanation) come
from v1's documented term groups over the same inputs, so the explanations a shopper
reads keep their meaning across versions.

On a GPU the module runs in bf16 (fp16 where bf16 is unsupported); on a CPU in fp32.
It is compiled with TorchScript when that works (measured faster than eager on this CPU);
otherwise it runs eagerly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from features.item_table import ItemTable
from ranking import export
from ranking.fusion import PAD_SCORE, RankBatch, RankOutputs, score_batch
from ranking.model import choose_device, repeat_signals

log = logging.getLogger(__name__)


class LearnedRanker:
    """A loaded artefact, ready to score batches against an item table."""

    def __init__(self, folder: Path, *, script: bool = True) -> None:
        self.device, self.dtype = choose_device()
        art = export.load(folder)
        self.config = art.config
        self.rows = art.item_rows()
        self.report = art.report
        module: Any = art.model.to(self.device, self.dtype).eval()
        self.scripted = False
        if script:
            try:
                module = torch.jit.script(module)
                self.scripted = True
            except Exception as exc:  # an exotic torch build must not stop serving
                log.warning("TorchScript compilation failed, running eagerly: %s", exc)
        self.module = module

    def behavioural_rows(self, ids: npt.NDArray[np.object_]) -> torch.Tensor:
        get = self.rows.get
        flat = [get(i.decode() if isinstance(i, bytes) else i, 0) for i in ids.ravel().tolist()]
        return torch.tensor(flat, dtype=torch.long).view(ids.shape)

    def inputs(self, batch: RankBatch, table: ItemTable) -> dict[str, torch.Tensor]:
        if batch.history_len > self.config.history_len:
            # Newest first: the model was trained on the newest history_len events.
            keep = self.config.history_len
            batch = RankBatch(
                user_emb=batch.user_emb,
                query_emb=batch.query_emb,
                history_ids=batch.history_ids[:, :keep],
                history_types=batch.history_types[:, :keep],
                history_age_s=batch.history_age_s[:, :keep],
                candidate_ids=batch.candidate_ids,
                signals=batch.signals,
            )
        b, h, n = batch.size, batch.history_len, batch.n_candidates
        hist_types = torch.from_numpy(batch.history_types.astype(np.int64))
        ages = torch.from_numpy(batch.history_age_s)
        if h == 0:
            # The model needs one slot; a padding slot is masked out inside.
            hist_types, ages = torch.zeros(b, 1, dtype=torch.long), torch.zeros(b, 1)
            hist_ids: npt.NDArray[np.object_] = np.full((b, 1), "", dtype=object)
        else:
            hist_ids = batch.history_ids
        hh = hist_ids.shape[1]
        hist_emb, hist_has = table.lookup(hist_ids.ravel().tolist())
        cand_emb, cand_has = table.lookup(batch.candidate_ids.ravel().tolist())
        real = hist_types > 0
        f = {
            "user_emb": torch.from_numpy(batch.user_emb),
            "query_emb": torch.from_numpy(batch.query_emb),
            "hist_text": torch.from_numpy(hist_emb).view(b, hh, -1),
            "hist_has_text": torch.from_numpy(hist_has).view(b, hh) & real,
            "hist_rows": self.behavioural_rows(hist_ids) * real,
            "hist_types": hist_types,
            "hist_age_s": ages,
            "cand_text": torch.from_numpy(cand_emb).view(b, n, -1),
            "cand_has_text": torch.from_numpy(cand_has).view(b, n),
            "cand_rows": self.behavioural_rows(batch.candidate_ids),
            "signals": torch.from_numpy(_with_repeats(batch)),
        }
        out = {}
        for k, v in f.items():
            v = v.to(self.device, non_blocking=True)
            out[k] = v.to(self.dtype) if v.is_floating_point() else v
        return out

    @torch.inference_mode()
    def score(self, batch: RankBatch, table: ItemTable) -> RankOutputs:
        """Scores from the trained model, explanations from v1's term groups."""
        explained = score_batch(batch, table)
        if batch.n_candidates == 0:
            return explained
        logits = self.module(**self.inputs(batch, table)).float().cpu().numpy()
        scores = np.where(batch.candidate_mask, logits, np.float32(PAD_SCORE)).astype(np.float32)
        return RankOutputs(scores, explained.reasons, explained.history_match)


def _with_repeats(batch: RankBatch) -> npt.NDArray[np.float32]:
    """The request's ``SIGNALS`` plus :func:`repeat_signals` of each user's candidates."""
    b, n = batch.size, batch.n_candidates
    out = np.zeros((b, n, 5), np.float32)
    out[:, :, :3] = batch.signals
    for r in range(b):
        out[r, :, 3:] = repeat_signals(
            batch.history_ids[r].tolist(),
            batch.history_age_s[r].tolist(),
            batch.candidate_ids[r].tolist(),
        )
    return out
