"""Triton python-backend model ``fused_ranker`` v2: the trained fused ranker.

Thin on purpose: the module is ``ranking.model.FusedRanker`` (weights and item list in
``ranker.pt`` / ``ranker.json`` beside this file, written by ``shoprec train``), the
scoring ``ranking.serve.LearnedRanker`` (its per-item work cached per catalogue change);
the Triton glue (item table kept fresh from Redis by a background thread, per-request
validation, one retrieval-to-top-K pass per dynamic batch, per-request errors) is
``ranking.triton_model``.  Same inputs and outputs as v1.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import triton_python_backend_utils as pb_utils

from ranking.serve import LearnedRanker
from ranking.triton_model import FusedRankerModel


class TritonPythonModel(FusedRankerModel):
    def initialize(self, args: dict[str, str]) -> None:
        if not torch.cuda.is_available():
            # The ranker's ops are small; extra threads only fight the worker for cores.
            torch.set_num_threads(int(os.environ.get("SHOPREC_RANKER_THREADS", "1")))
        ranker = LearnedRanker(Path(__file__).resolve().parent)
        about = (
            f"trained ranker on {ranker.device} ({ranker.dtype}, "
            f"TorchScript={ranker.scripted}), {len(ranker.rows)} behavioural items"
        )
        self.setup(args, pb_utils, ranker, about)
