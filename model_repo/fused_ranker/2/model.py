"""Triton python-backend model ``fused_ranker`` v2: the trained fused ranker.

Thin on purpose: the module is ``ranking.model.FusedRanker`` (weights and item list in
``ranker.pt`` / ``ranker.json`` beside this file, written by ``shoprec train``), the
glue ``ranking.serve.LearnedRanker``, the item table ``ranking.item_table``.  Same
inputs and outputs as v1; every request of a dynamic batch is validated alone, then all
are stacked and scored in one forward pass.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from ranking.fusion import TRITON_INPUTS, TRITON_OUTPUTS, RankBatch
from ranking.item_table import ItemTable, ItemTableRefresher
from ranking.serve import LearnedRanker

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.logger = pb_utils.Logger
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        if not torch.cuda.is_available():
            # The ranker's ops are small; extra threads only fight the worker for cores.
            torch.set_num_threads(int(os.environ.get("SHOPREC_RANKER_THREADS", "1")))
        config = json.loads(args["model_config"])
        params = config.get("parameters", {})
        interval = float(params.get("ITEM_REFRESH_INTERVAL_S", {}).get("string_value", "0.5"))
        self.ranker = LearnedRanker(Path(__file__).resolve().parent)
        self.table = ItemTable()
        url = os.environ.get("SHOPREC_REDIS_URL", DEFAULT_REDIS_URL)
        self.refresher = ItemTableRefresher.from_url(self.table, url, interval_s=interval)
        loaded = self.refresher.catch_up()
        self.logger.log_info(
            f"fused_ranker v{args['model_version']}: trained ranker on {self.ranker.device} "
            f"({self.ranker.dtype}, TorchScript={self.ranker.scripted}), "
            f"{len(self.ranker.rows)} behavioural items, {loaded} items loaded from Redis"
        )

    def execute(self, requests: list) -> list:
        self.refresher.maybe_refresh()
        responses: list = [None] * len(requests)
        batches: list[RankBatch] = []
        owners: list[int] = []
        for i, request in enumerate(requests):
            try:
                batches.append(_decode(request))
                owners.append(i)
            except (ValueError, AttributeError) as exc:
                responses[i] = _error(f"bad fused_ranker request: {exc}", "INVALID_ARG")

        if batches:
            try:
                out = self.ranker.score(RankBatch.concat(batches), self.table)
            except Exception as exc:  # a failed batch must still answer every request
                self.logger.log_error(f"fused_ranker: scoring failed: {exc!r}")
                for i in owners:
                    responses[i] = _error(f"scoring failed: {exc}", "INTERNAL")
            else:
                start = 0
                for i, batch in zip(owners, batches, strict=True):
                    stop, n = start + batch.size, batch.n_candidates
                    tensors = [
                        pb_utils.Tensor(name, np.ascontiguousarray(arr[start:stop, :n]))
                        for name, arr in zip(TRITON_OUTPUTS, out.arrays(), strict=True)
                    ]
                    responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
                    start = stop
        return responses

    def finalize(self) -> None:
        self.refresher.close()


def _decode(request) -> RankBatch:
    arrays = {}
    for name, field in TRITON_INPUTS:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            raise ValueError(f"missing input {name}")
        arrays[field] = tensor.as_numpy()
    batch = RankBatch(**arrays)
    batch.validate()
    return batch


def _error(message: str, code: str) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(message, getattr(pb_utils.TritonError, code))
    )
