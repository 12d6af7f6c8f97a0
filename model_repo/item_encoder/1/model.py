"""Triton python-backend model ``item_encoder``: text -> 384-d unit embedding.

Thin on purpose: the encoder lives in ``ranking.encoder`` so the worker,
tests and training produce identical vectors in-process.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from ranking.encoder import TextEncoder


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.logger = pb_utils.Logger
        self.encoder = TextEncoder.from_pretrained()
        config = json.loads(args["model_config"])
        dim = int(pb_utils.get_output_config_by_name(config, "EMBEDDING")["dims"][0])
        if dim != self.encoder.dim:
            raise pb_utils.TritonModelException(
                f"config says EMBEDDING has {dim} dims, the encoder makes {self.encoder.dim}"
            )
        self.logger.log_info(f"item_encoder: loaded on {self.encoder.device}")

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        texts: list[str] = []
        spans: list[tuple[int, int, int]] = []  # (request index, start, stop) into texts
        for i, request in enumerate(requests):
            try:
                raw = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy()
                decoded = [t.decode("utf-8") for t in raw.reshape(-1)]
            except (AttributeError, UnicodeDecodeError) as exc:
                responses[i] = _error(f"TEXT must be UTF-8 strings: {exc}", "INVALID_ARG")
                continue
            spans.append((i, len(texts), len(texts) + len(decoded)))
            texts.extend(decoded)

        if spans:
            try:
                # One forward pass for the whole dynamic batch.
                embs = self.encoder.encode(texts)
            except Exception as exc:  # a failed pass must still answer every request
                self.logger.log_error(f"item_encoder: forward pass failed: {exc!r}")
                for i, _, _ in spans:
                    responses[i] = _error(f"encoder failed: {exc}", "INTERNAL")
            else:
                for i, start, stop in spans:
                    out = pb_utils.Tensor("EMBEDDING", np.ascontiguousarray(embs[start:stop]))
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[out])
        return responses

    def finalize(self) -> None:
        self.encoder = None


def _error(message: str, code: str) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(message, getattr(pb_utils.TritonError, code))
    )
