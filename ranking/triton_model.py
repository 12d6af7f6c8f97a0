"""The Triton python-backend glue that every ``fused_ranker`` version shares.

A version's ``model.py`` subclasses :class:`FusedRankerModel` and, in ``initialize``,
calls :meth:`FusedRankerModel.setup` with Triton's ``triton_python_backend_utils``
module and what scores a batch.  The utilities are passed in because that module
exists only inside Triton's stub process.  This module does the rest:

* the item table: loaded from Redis during ``initialize``, then kept fresh by an
  :class:`~features.item_table.ItemLogFollower` thread, so ``execute`` never waits on
  Redis; it only copies in the rows the thread has prepared;
* each request of a dynamic batch is decoded and validated alone: a bad one gets
  ``INVALID_ARG`` and the others are still scored;
* all valid requests are stacked and scored in one call, and the outputs are split
  back per request;
* if scoring fails, every request in it gets ``INTERNAL`` and no traceback.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from features.item_table import ItemLogFollower, ItemTable
from ranking.fusion import TRITON_INPUTS, TRITON_OUTPUTS, RankBatch, RankOutputs

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_REFRESH_INTERVAL_S = 0.5

Scorer = Callable[[RankBatch, ItemTable], RankOutputs]
"""What a version scores with: a valid batch and the item table -> outputs."""


class TritonUtils(Protocol):
    """The parts of ``triton_python_backend_utils`` this glue uses."""

    Tensor: Any
    InferenceResponse: Any
    TritonError: Any
    Logger: Any

    def get_input_tensor_by_name(self, request: Any, name: str) -> Any: ...


class FusedRankerModel:
    """Base of ``TritonPythonModel`` for every ``fused_ranker`` version.

    Triton calls ``initialize`` (the subclass's: it calls :meth:`setup`), then
    :meth:`execute` per dynamic batch on one thread, then :meth:`finalize`.
    """

    pb_utils: TritonUtils
    score: Scorer
    table: ItemTable
    follower: ItemLogFollower

    def setup(
        self, args: Mapping[str, str], pb_utils: TritonUtils, score: Scorer, about: str = ""
    ) -> None:
        """Load the item table from Redis and start following ``items:log``.

        ``args`` is what Triton passed to ``initialize``; ``about`` is added to the
        start-up log line (what scores, on which device).  Start-up may take its time,
        but serving never waits on Redis.
        """
        # features.item_table logs through `logging`; the stub's stderr lands in Triton's log.
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        self.pb_utils = pb_utils
        self.score = score
        self.table = ItemTable()
        url = os.environ.get("SHOPREC_REDIS_URL", DEFAULT_REDIS_URL)
        interval = refresh_interval_s(json.loads(args["model_config"]))
        self.follower = ItemLogFollower.from_url(url, dim=self.table.dim, interval_s=interval)
        loaded = self.follower.catch_up(self.table)
        self.follower.start()
        detail = f"{about}, " if about else ""
        pb_utils.Logger.log_info(
            f"fused_ranker v{args['model_version']}: {detail}{loaded} items loaded from Redis"
        )

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        """One response per request, in order; never raises for a bad request or Redis."""
        self.follower.apply_pending(self.table)
        pb = self.pb_utils
        responses: list[Any] = [None] * len(requests)
        batches: list[RankBatch] = []
        owners: list[int] = []
        for i, request in enumerate(requests):
            try:
                batches.append(decode_request(pb, request))
                owners.append(i)
            except (ValueError, AttributeError) as exc:
                responses[i] = error_response(pb, f"bad fused_ranker request: {exc}", "INVALID_ARG")
        if not batches:
            return responses
        try:
            out = self.score(RankBatch.concat(batches), self.table)
        except Exception as exc:  # a failed batch must still answer every request
            pb.Logger.log_error(f"fused_ranker: scoring failed: {exc!r}")
            for i in owners:
                responses[i] = error_response(pb, f"scoring failed: {exc}", "INTERNAL")
            return responses
        for i, arrays in zip(owners, split_outputs(out, batches), strict=True):
            tensors = [
                pb.Tensor(name, arr) for name, arr in zip(TRITON_OUTPUTS, arrays, strict=True)
            ]
            responses[i] = pb.InferenceResponse(output_tensors=tensors)
        return responses

    def finalize(self) -> None:
        """Stop the follower thread (Triton unloads the model or shuts down)."""
        self.follower.close()


def refresh_interval_s(model_config: Mapping[str, Any]) -> float:
    """``ITEM_REFRESH_INTERVAL_S`` from ``config.pbtxt``'s parameters, or the default."""
    param = model_config.get("parameters", {}).get("ITEM_REFRESH_INTERVAL_S", {})
    return float(param.get("string_value", DEFAULT_REFRESH_INTERVAL_S))


def decode_request(pb_utils: TritonUtils, request: Any) -> RankBatch:
    """One request's inputs as a validated :class:`RankBatch`; ``ValueError`` if invalid."""
    arrays = {}
    for name, field in TRITON_INPUTS:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            raise ValueError(f"missing input {name}")
        arrays[field] = tensor.as_numpy()
    batch = RankBatch(**arrays)
    batch.validate()
    return batch


def split_outputs(
    out: RankOutputs, batches: Sequence[RankBatch]
) -> list[tuple[npt.NDArray[Any], ...]]:
    """Each request's slice of the stacked outputs, in :data:`TRITON_OUTPUTS` order.

    Requests were padded to the widest candidate list when stacked; each slice is cut
    back to its own width, contiguous, as Triton's output tensors must be.
    """
    parts = []
    start = 0
    for batch in batches:
        stop, n = start + batch.size, batch.n_candidates
        parts.append(tuple(np.ascontiguousarray(arr[start:stop, :n]) for arr in out.arrays()))
        start = stop
    return parts


def error_response(pb_utils: TritonUtils, message: str, code: str) -> Any:
    """An error response with ``TritonError.<code>`` (``INVALID_ARG``, ``INTERNAL``)."""
    error = pb_utils.TritonError(message, getattr(pb_utils.TritonError, code))
    return pb_utils.InferenceResponse(error=error)
