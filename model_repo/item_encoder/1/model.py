"""Triton python-backend model ``item_encoder``: catalogue text -> 384-d unit embedding.

Thin on purpose: the glue is ``ranking.encoder_model`` (shared with ``query_encoder``),
the encoder ``ranking.encoder``, so the worker, tests and training make identical vectors.
"""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from ranking.encoder_model import EncoderModel


class TritonPythonModel(EncoderModel):
    def initialize(self, args: dict[str, str]) -> None:
        self.setup(args, pb_utils)
