"""The Triton python-backend glue of the BERT encoders (``item_encoder``, ``query_encoder``).

Both models run ``ranking.encoder.TextEncoder`` (all-MiniLM-L6-v2), so the worker, tests
and training make identical vectors; each model's ``model.py`` is a few lines around
:class:`EncoderModel`.  Two models, not one, because the catalogue and the searches
want different things from the same CPU:

* ``item_encoder`` embeds the catalogue: many long texts, nobody waiting on one.  On a
  CPU it runs one torch thread at a lower scheduling priority (``NICE`` in its
  ``config.pbtxt``: 10), in its own stub process, so a catalogue load takes the cores
  only when the ranker, the worker and the broker leave them idle.  Measured before
  this split: 682 recommendations went out degraded while 2,428 long items were being
  embedded, their ranker calls timed out behind the encoder on the same two cores.
* ``query_encoder`` embeds search queries, one per search event, with a user waiting:
  normal priority.

Each request of a dynamic batch is decoded alone (bad UTF-8 gets ``INVALID_ARG``, the
others are still served); the batch is one forward pass; a failed pass answers every
request with ``INTERNAL``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ranking.encoder import TextEncoder


class EncoderModel:
    """Base of ``TritonPythonModel`` for the encoders; ``pb_utils`` passed in (it exists
    only inside Triton's stub process)."""

    def setup(self, args: Mapping[str, str], pb_utils: Any) -> None:
        self.pb = pb_utils
        config = json.loads(args["model_config"])
        name = config.get("name", "encoder")
        params = config.get("parameters", {})
        nice = int(params.get("NICE", {}).get("string_value", "0"))
        if nice:
            os.nice(nice)  # this stub process only: the model's own instance
        self.encoder = TextEncoder.from_pretrained()
        if self.encoder.device.type == "cpu":
            threads = int(params.get("THREADS", {}).get("string_value", "1"))
            torch.set_num_threads(threads)
        dim = int(pb_utils.get_output_config_by_name(config, "EMBEDDING")["dims"][0])
        if dim != self.encoder.dim:
            raise pb_utils.TritonModelException(
                f"config says EMBEDDING has {dim} dims, the encoder makes {self.encoder.dim}"
            )
        pb_utils.Logger.log_info(
            f"{name}: loaded on {self.encoder.device}, {torch.get_num_threads()} thread(s), "
            f"nice {nice}"
        )

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        pb = self.pb
        responses: list[Any] = [None] * len(requests)
        texts: list[str] = []
        spans: list[tuple[int, int, int]] = []  # (request index, start, stop) into texts
        for i, request in enumerate(requests):
            try:
                raw = pb.get_input_tensor_by_name(request, "TEXT").as_numpy()
                decoded = [t.decode("utf-8") for t in raw.reshape(-1)]
            except (AttributeError, UnicodeDecodeError) as exc:
                responses[i] = self._error(f"TEXT must be UTF-8 strings: {exc}", "INVALID_ARG")
                continue
            spans.append((i, len(texts), len(texts) + len(decoded)))
            texts.extend(decoded)
        if spans:
            try:
                embs = self.encoder.encode(texts)  # one forward pass for the dynamic batch
            except Exception as exc:  # a failed pass must still answer every request
                pb.Logger.log_error(f"encoder: forward pass failed: {exc!r}")
                for i, _, _ in spans:
                    responses[i] = self._error(f"encoder failed: {exc}", "INTERNAL")
            else:
                for i, start, stop in spans:
                    out = pb.Tensor("EMBEDDING", np.ascontiguousarray(embs[start:stop]))
                    responses[i] = pb.InferenceResponse(output_tensors=[out])
        return responses

    def finalize(self) -> None:
        self.encoder = None  # type: ignore[assignment]

    def _error(self, message: str, code: str) -> Any:
        error = self.pb.TritonError(message, getattr(self.pb.TritonError, code))
        return self.pb.InferenceResponse(error=error)
