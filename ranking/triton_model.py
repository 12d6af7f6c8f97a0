"""The Triton python-backend glue that every ``fused_ranker`` version shares.

A version's ``model.py`` subclasses :class:`FusedRankerModel` and, in ``initialize``,
calls :meth:`FusedRankerModel.setup` with Triton's ``triton_python_backend_utils``
module and its :class:`~ranking.pipeline.Scorer`.  The utilities are passed in because
that module exists only inside Triton's stub process.  This module does the rest:

* the item table: loaded from Redis during ``initialize``, then kept fresh by an
  :class:`~features.item_table.ItemLogFollower` thread, so ``execute`` never waits on
  Redis; it only copies in the rows the thread has prepared — at most
  :data:`APPLY_PER_CALL` items per call, so a catalogue burst never stalls one batch —
  and updates what it derives from them (the retrieval index, the scorer's item cache);
* each request of a dynamic batch is decoded and validated alone: a bad one gets
  ``INVALID_ARG`` and the others are still served;
* all valid requests go through :func:`ranking.pipeline.recommend` together (retrieval,
  mixing, filters, scoring, top-K, explanations), and the outputs are split back;
* if that fails, every request in it gets ``INTERNAL`` and no traceback.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from pydantic import TypeAdapter

from features.ann import TableIndex
from features.item_table import ItemLogFollower, ItemTable
from ranking.pipeline import (
    TRITON_INPUTS,
    TRITON_OUTPUTS,
    RecommendRequest,
    Scorer,
    recommend,
)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_REFRESH_INTERVAL_S = 0.5
APPLY_PER_CALL = 1024
"""Item changes one ``execute`` takes in (row copies, the trained ranker's item cache
(about 100,000 items/s on one core) and the retrieval index: ~10 ms on a CPU); the rest
wait for the next call, so a catalogue load adds milliseconds to batches, never seconds."""


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
    scorer: Scorer
    table: ItemTable
    index: TableIndex
    follower: ItemLogFollower

    def setup(
        self, args: Mapping[str, str], pb_utils: TritonUtils, scorer: Scorer, about: str = ""
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
        self.scorer = scorer
        self.table = ItemTable()
        # Rebuilds of the IVF index while serving run in a thread; the first, here, is waited
        # for: nothing is served until initialize returns.
        self.index = TableIndex(self.table, background=True)
        url = os.environ.get("SHOPREC_REDIS_URL", DEFAULT_REDIS_URL)
        interval = refresh_interval_s(json.loads(args["model_config"]))
        # Read as Settings reads SHOPREC_REDIS_CLUSTER (pydantic's words for a bool).
        cluster = TypeAdapter(bool).validate_python(
            os.environ.get("SHOPREC_REDIS_CLUSTER") or "false"
        )
        self.follower = ItemLogFollower.from_url(
            url, cluster=cluster, dim=self.table.dim, interval_s=interval
        )
        loaded = self.follower.catch_up(self.table)
        self._derive()
        self.index.wait_built()
        self.follower.start()
        detail = f"{about}, " if about else ""
        pb_utils.Logger.log_info(
            f"fused_ranker v{args['model_version']}: {detail}{loaded} items loaded from Redis"
        )

    def _derive(self) -> None:
        """Bring the retrieval index and the scorer's item cache up to the table."""
        changed = self.table.take_changed()
        self.index.changed(changed)
        self.scorer.sync(self.table, changed)
        self.index.index()  # built here, not by the next request (faiss IVF: seconds)

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        """One response per request, in order; never raises for a bad request or Redis."""
        if self.follower.apply_pending(self.table, limit=APPLY_PER_CALL):
            self._derive()
        pb = self.pb_utils
        responses: list[Any] = [None] * len(requests)
        batches: list[RecommendRequest] = []
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
            out = recommend(RecommendRequest.concat(batches), self.table, self.index, self.scorer)
        except Exception as exc:  # a failed batch must still answer every request
            pb.Logger.log_error(f"fused_ranker: recommending failed: {exc!r}")
            for i in owners:
                responses[i] = error_response(pb, f"recommending failed: {exc}", "INTERNAL")
            return responses
        arrays = out.arrays()
        start = 0
        for i, batch in zip(owners, batches, strict=True):
            stop = start + batch.size
            tensors = [
                pb.Tensor(name, np.ascontiguousarray(arrays[name.lower()][start:stop]))
                for name in TRITON_OUTPUTS
            ]
            responses[i] = pb.InferenceResponse(output_tensors=tensors)
            start = stop
        return responses

    def finalize(self) -> None:
        """Stop the follower thread (Triton unloads the model or shuts down)."""
        self.follower.close()


def refresh_interval_s(model_config: Mapping[str, Any]) -> float:
    """``ITEM_REFRESH_INTERVAL_S`` from ``config.pbtxt``'s parameters, or the default."""
    param = model_config.get("parameters", {}).get("ITEM_REFRESH_INTERVAL_S", {})
    return float(param.get("string_value", DEFAULT_REFRESH_INTERVAL_S))


def decode_request(pb_utils: TritonUtils, request: Any) -> RecommendRequest:
    """One request's inputs as a validated :class:`RecommendRequest`; ``ValueError`` if
    invalid."""
    arrays = {}
    for name in TRITON_INPUTS:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            raise ValueError(f"missing input {name}")
        arrays[name.lower()] = tensor.as_numpy()
    batch = RecommendRequest(**arrays)
    batch.validate()
    return batch


def error_response(pb_utils: TritonUtils, message: str, code: str) -> Any:
    """An error response with ``TritonError.<code>`` (``INVALID_ARG``, ``INTERNAL``)."""
    error = pb_utils.TritonError(message, getattr(pb_utils.TritonError, code))
    return pb_utils.InferenceResponse(error=error)
