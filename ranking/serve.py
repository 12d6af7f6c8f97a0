"""The trained ranker as a pipeline scorer: what Triton's ``fused_ranker`` v2 scores with.

The module is ``ranking.model.FusedRanker`` from an artefact folder (``ranker.json`` +
``ranker.pt``, :mod:`ranking.export`).  Whatever it computes per item alone — the item's
vector (BERT row projected, plus its behavioural row from training), the target-attention
query and the fusion head's candidate term (:meth:`FusedRanker.item_cache`) — is computed
when the catalogue changes (:meth:`LearnedRanker.sync`), never per request: a request only
gathers rows by item number and runs :meth:`FusedRanker.score`.  Items the artefact never
saw get behavioural row 0 and rank from text and signals.  Explanations come from v1's
documented term groups (:func:`ranking.fusion.explain`), so a reason keeps its meaning
across versions.

On a GPU the module runs in bf16 (fp16 where bf16 is unsupported); on a CPU in fp32.  It
is compiled with TorchScript when that works (measured faster than eager on this CPU);
otherwise it runs eagerly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from features.candidates import Mixed
from features.item_table import ItemTable
from ranking import export
from ranking.fusion import explain
from ranking.model import choose_device, memory_signals, repeat_signals
from ranking.pipeline import RecommendRequest

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
CACHE_CHUNK = 4096
"""Items per item_cache pass when the catalogue changes (bounds the temporary memory)."""


class LearnedRanker:
    """A loaded artefact and its per-item cache, kept in step with one :class:`ItemTable`."""

    def __init__(self, folder: Path, *, script: bool = True) -> None:
        self.device, self.dtype = choose_device()
        art = export.load(folder)
        self.config = art.config
        self.rows = art.item_rows()
        self.report = art.report
        self.complements = art.complements
        self.complement_order = art.complement_order
        module: Any = art.model.to(self.device, self.dtype).eval()
        self.scripted = False
        if script:
            try:
                module = torch.jit.script(module)
                self.scripted = True
            except Exception as exc:  # an exotic torch build must not stop serving
                log.warning("TorchScript compilation failed, running eagerly: %s", exc)
        self.module = module
        d = self.config.d
        # Row i caches item number i; the last row is "unknown item" (number -1).
        self._vec = torch.zeros(1, d, device=self.device, dtype=self.dtype)
        self._q = torch.zeros_like(self._vec)
        self._head = torch.zeros_like(self._vec)
        self._behavioural = np.zeros(1, np.int64)
        text_dim = self.config.text_dim
        self._fill(np.array([0]), np.zeros((1, text_dim), np.float32), np.zeros(1, bool), [0])

    @property
    def cached(self) -> int:
        """Item numbers the cache covers (excluding the unknown-item row)."""
        return int(self._vec.shape[0]) - 1

    @torch.inference_mode()
    def sync(self, table: ItemTable, changed: I64) -> int:
        """Recompute the cache rows of the item numbers ``changed`` (every row when the
        table outgrew the cache); returns rows computed."""
        if table.size > self.cached:
            self._grow(max(2 * self.cached, table.size))
            changed = np.arange(table.size, dtype=np.int64)
        for start in range(0, changed.size, CACHE_CHUNK):
            nums = changed[start : start + CACHE_CHUNK]
            text, has = table.text(nums)
            ids = table.id_of(nums)
            rows = [self.rows.get(i, 0) if i is not None else 0 for i in ids]
            self._fill(nums, text, has, rows)
        return int(changed.size)

    def _grow(self, n: int) -> None:
        old = self.cached
        unknown = (self._vec[-1:], self._q[-1:], self._head[-1:])
        grown = []
        for part, last in zip((self._vec, self._q, self._head), unknown, strict=True):
            fresh = torch.zeros(n + 1, part.shape[1], device=self.device, dtype=self.dtype)
            fresh[:old] = part[:old]
            fresh[n] = last[0]
            grown.append(fresh)
        self._vec, self._q, self._head = grown
        behavioural = np.zeros(n + 1, np.int64)
        behavioural[:old] = self._behavioural[:old]
        self._behavioural = behavioural

    def _fill(self, nums: I64, text: F32, has: npt.NDArray[np.bool_], rows: list[int]) -> None:
        """Cache rows for item numbers ``nums`` (the unknown-item row when the cache is empty)."""
        idx = torch.from_numpy(np.where(nums < self.cached, nums, self.cached)).to(self.device)
        vec, q, head = self.module.item_cache(
            torch.from_numpy(text).to(self.device, self.dtype),
            torch.from_numpy(has).to(self.device),
            torch.tensor(rows, dtype=torch.long, device=self.device),
        )
        self._vec[idx], self._q[idx], self._head[idx] = vec, q, head
        self._behavioural[nums] = rows

    def _gather(self, nums: I64) -> torch.Tensor:
        """Cache row index of item numbers (-1 and numbers past the cache: unknown)."""
        safe = np.where((nums >= 0) & (nums < self.cached), nums, self.cached)
        return torch.from_numpy(safe).to(self.device)

    @torch.inference_mode()
    def score(self, request: RecommendRequest, cands: Mixed, table: ItemTable) -> F32:
        """The trained model's logits for each candidate, ``[B, n]``."""
        h = min(request.history.shape[1], self.config.history_len)
        # Newest first: the model was trained on the newest history_len events.
        hist = request.history[:, :h].astype(np.int64)
        types = request.history_types[:, :h]
        ages = np.maximum(request.history_age_s[:, :h], np.float32(0.0))
        real = types > 0
        hist = np.where(real, hist, -1)
        items = cands.items
        hist_text, _ = table.text(hist)
        cand_text, _ = table.text(items)
        if self.config.memory:
            repeats = memory_signals(
                hist, ages, request.memory.astype(np.int64), request.memory_count, items
            )
        else:
            repeats = repeat_signals(hist, ages, items)
        signals = np.concatenate([cands.signals, repeats], axis=-1)
        hi, ci = self._gather(hist), self._gather(items)
        dev, dt = self.device, self.dtype

        def t(x: npt.NDArray[Any]) -> torch.Tensor:
            out = torch.from_numpy(np.ascontiguousarray(x)).to(dev)
            return out.to(dt) if out.is_floating_point() else out

        logits = self.module.score(
            t(request.user_emb),
            t(request.query_emb),
            self._vec[hi],
            t(hist_text),
            t(types.astype(np.int64)),
            t(ages),
            self._vec[ci],
            self._q[ci],
            self._head[ci],
            t(cand_text),
            t(signals),
        )
        scores: F32 = logits.float().cpu().numpy()
        return scores

    def explain(
        self, request: RecommendRequest, items: I64, signals: F32, table: ItemTable
    ) -> tuple[I32, I32]:
        return explain(request, items, signals, table)
