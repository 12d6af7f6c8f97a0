"""Triton python-backend model ``fused_ranker`` v1: the fixed fusion.

Thin on purpose: the maths is ``ranking.fusion.FusionScorer``; the Triton glue (item
table kept fresh from Redis by a background thread, per-request validation, one
retrieval-to-top-K pass per dynamic batch, per-request errors) is ``ranking.triton_model``.
"""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from ranking.fusion import FusionScorer
from ranking.triton_model import FusedRankerModel


class TritonPythonModel(FusedRankerModel):
    def initialize(self, args: dict[str, str]) -> None:
        self.setup(args, pb_utils, FusionScorer(), "fixed fusion")
