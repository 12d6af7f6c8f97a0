"""The one async Triton client the worker uses: text encoding and ranking.

Open one :class:`RankerClient` at start-up, :meth:`~RankerClient.wait_ready`
(which also opens the gRPC channel: the first call otherwise pays ~58 ms of
connection set-up), then share it.  Every failure -- a tritonclient error, a
timeout, a server-side per-request error -- surfaces as
:class:`shoprec.errors.RankerUnavailable`, so the worker has one thing to
catch before falling back to retrieval scores.  ``retriable`` on that error
is False when retrying the same call cannot help (the request was invalid).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from features.keys import EMB_DIM
from ranking.breaker import CircuitBreaker
from ranking.pipeline import (
    TRITON_INPUTS,
    TRITON_OUTPUTS,
    RecommendRequest,
    TopK,
    empty_request,
)
from shoprec.errors import RankerUnavailable
from shoprec.retry import retry
from shoprec.settings import Settings

__all__ = ["MAX_BATCH", "RANKER_MAX_BATCH", "Ranked", "RankerClient"]

T = TypeVar("T")

MAX_BATCH = 64
"""``item_encoder``'s ``max_batch_size``: more texts go as several requests."""
RANKER_MAX_BATCH = 256
"""``fused_ranker``'s ``max_batch_size``: a worker's micro-batch (SHOPREC_BATCH_MAX, 128 by
default) is one request."""

_TRITON_DTYPES = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.int32): "INT32",
    np.dtype(np.object_): "BYTES",
}
# Small on purpose: a second UNAVAILABLE attempt only bridges a reconnect or
# a model swap; more would eat the latency budget the fallback exists for.
_RETRY_ATTEMPTS = 2
_RETRY_BASE_S = 0.02
_RETRY_CAP_S = 0.1


@dataclass(frozen=True)
class Ranked:
    """The ranker's answer for a :class:`RecommendRequest`: the top-K and who answered."""

    top: TopK
    model_version: str


class _Unavailable(ConnectionError):
    """Triton said UNAVAILABLE: the one error :func:`shoprec.retry.retry` should retry here."""

    def __init__(self, cause: InferenceServerException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _status(exc: InferenceServerException) -> str:
    # tritonclient reports gRPC codes as "StatusCode.UNAVAILABLE"; local errors have none.
    return str(exc.status() or "").rsplit(".", 1)[-1]


def _to_input(name: str, array: npt.NDArray[Any]) -> grpcclient.InferInput:
    dtype = _TRITON_DTYPES.get(array.dtype)
    if dtype is None:
        raise RankerUnavailable(f"input {name} has unsupported dtype {array.dtype}")
    inp = grpcclient.InferInput(name, list(array.shape), dtype)
    inp.set_data_from_numpy(np.ascontiguousarray(array))
    return inp


class RankerClient:
    """Async gRPC client for Triton's ``item_encoder`` and ``fused_ranker``.

    ``timeout_s`` bounds each inference call (gRPC deadline).  ``breaker``
    (one per server) refuses calls at once while Triton is down, so a dead
    server is probed after a cool-down instead of being called per batch.
    ``url`` may name several servers (``host:port,host:port``): each call goes to
    the least busy one whose breaker lets it through (round robin among equals),
    and a call that fails there is sent once more to another, so one server
    going away costs a retry, not a degraded recommendation.
    Not safe to share across event loops; one instance per worker process.
    """

    def __init__(
        self,
        url: str,
        item_encoder_model: str = "item_encoder",
        ranker_model: str = "fused_ranker",
        *,
        timeout_s: float = 2.0,
        max_batch: int = MAX_BATCH,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        if timeout_s <= 0 or max_batch < 1:
            raise ValueError("timeout_s must be > 0 and max_batch >= 1")
        urls = [u.strip() for u in url.split(",") if u.strip()]
        if not urls:
            raise ValueError(f"no Triton server in {url!r} (host:port, comma-separated)")
        self.url = url
        # One server: its breaker.  Several: the template each server's own copies.
        self.breaker = breaker or CircuitBreaker(f"triton {url}")
        self.item_encoder_model = item_encoder_model
        self.ranker_model = ranker_model
        self.timeout_s = timeout_s
        self.max_batch = max_batch
        self._servers: _Servers | None = None
        if len(urls) == 1:
            self._client = grpcclient.InferenceServerClient(urls[0], channel_args=_channel_args())
            self.breakers = [self.breaker]
            return
        # Several servers (SHOPREC_TRITON_URL=host:port,host:port): a client and a breaker
        # each; calls are spread over them (_infer), and readiness is any server's.
        self._servers = _Servers(
            [
                RankerClient(
                    u,
                    item_encoder_model,
                    ranker_model,
                    timeout_s=timeout_s,
                    max_batch=max_batch,
                    breaker=self.breaker.twin(f"triton {u}"),
                )
                for u in urls
            ]
        )
        self._client = self._servers
        self.breakers = [server.client.breaker for server in self._servers.servers]

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        breaker: CircuitBreaker | None = None,
        timeout_s: float | None = None,
    ) -> RankerClient:
        """The client of the configured Triton server(s) and models (``SHOPREC_TRITON_*``);
        ``breaker`` sets the thresholds of every server's breaker; ``timeout_s`` replaces
        ``SHOPREC_TRITON_TIMEOUT_S`` (the catalogue's encoding has its own)."""
        return cls(
            settings.triton_url,
            settings.item_encoder_model,
            settings.ranker_model,
            timeout_s=timeout_s or settings.triton_timeout_s,
            breaker=breaker,
        )

    async def __aenter__(self) -> RankerClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        # With several servers, _client is the _Servers, which closes each one's channel.
        await self._client.close()

    # --- readiness ------------------------------------------------------------------

    async def wait_ready(
        self, models: Sequence[str] | None = None, timeout_s: float = 60.0, *, warm: bool = True
    ) -> None:
        """Wait until the server and ``models`` (default: both) are ready, then warm them.

        Raises :class:`RankerUnavailable` naming what was not ready when
        ``timeout_s`` runs out.  Warming sends one tiny request per known
        model, so the first real event does not pay for lazy set-up.
        """
        wanted = (
            list(models) if models is not None else [self.item_encoder_model, self.ranker_model]
        )
        deadline = time.monotonic() + timeout_s
        pending = ["<server>", *wanted]
        last_error = ""
        while True:
            try:
                if pending[0] == "<server>" and await self._client.is_server_ready(
                    client_timeout=1.0
                ):
                    pending.pop(0)
                while pending and await self._client.is_model_ready(pending[0], client_timeout=1.0):
                    pending.pop(0)
            except InferenceServerException as exc:
                last_error = f" (last error: {exc.message()})"
            if not pending:
                break
            if time.monotonic() >= deadline:
                raise RankerUnavailable(
                    f"Triton at {self.url}: {', '.join(pending)} not ready after "
                    f"{timeout_s:.0f} s{last_error}. Is tritonserver running with "
                    "model_repo/ loaded? Check SHOPREC_TRITON_URL."
                )
            await asyncio.sleep(0.2)
        if warm:
            await self.warm_up(wanted)

    async def serves_version(self, version: str) -> bool:
        """Whether Triton has this version of the ranker loaded (any server, with several):
        an experiment's arm that names a version Triton dropped would otherwise fail every
        call it makes and open the breaker for every arm."""
        try:
            return bool(
                await self._client.is_model_ready(self.ranker_model, version, client_timeout=2.0)
            )
        except InferenceServerException:
            return False

    async def warm_up(self, models: Sequence[str] | None = None) -> None:
        """One minimal request to each of ``models`` that this client knows how to call."""
        names = set(models) if models is not None else {self.item_encoder_model, self.ranker_model}
        for name in sorted(names - {self.ranker_model}):  # the encoders
            await self.encode(["warm-up"], model=name)
        if self.ranker_model in names:
            await self.recommend(empty_request(1))

    # --- inference ------------------------------------------------------------------

    async def encode(
        self, texts: Sequence[str], model: str | None = None
    ) -> npt.NDArray[np.float32]:
        """BERT embeddings ``[len(texts), 384]``, unit length, in input order, from
        ``model`` (default: the catalogue's ``item_encoder``; search queries go to the
        ``query_encoder``, the same encoder at normal priority).

        Chunks of at most ``max_batch`` texts go out as concurrent requests,
        which Triton's dynamic batcher may merge again.
        """
        model = model or self.item_encoder_model
        if not texts:
            return np.zeros((0, EMB_DIM), np.float32)
        chunks = [texts[i : i + self.max_batch] for i in range(0, len(texts), self.max_batch)]

        async def one(chunk: Sequence[str]) -> npt.NDArray[np.float32]:
            array = np.array([[t.encode("utf-8")] for t in chunk], dtype=object)
            result = await self._infer(model, [_to_input("TEXT", array)], ["EMBEDDING"])
            emb: npt.NDArray[np.float32] | None = result.as_numpy("EMBEDDING")
            if emb is None or emb.shape != (len(chunk), EMB_DIM):
                raise RankerUnavailable(
                    f"{model} returned EMBEDDING of shape "
                    f"{None if emb is None else emb.shape}, expected {(len(chunk), EMB_DIM)}"
                )
            return emb.astype(np.float32, copy=False)

        parts = await _gather_all([one(c) for c in chunks])
        return np.concatenate(parts)

    async def recommend(self, request: RecommendRequest, model_version: str = "") -> Ranked:
        """Retrieve, mix, filter, score and pick the top-K for ``request``'s users on
        Triton; more than :data:`RANKER_MAX_BATCH` users go as concurrent requests.
        ``model_version`` asks for one version of the ranker (an experiment's arm; Triton
        must keep it loaded), empty for the one Triton serves by its version policy.

        Raises :class:`RankerUnavailable` (``retriable`` False) for a request that fails
        :meth:`RecommendRequest.validate`, without calling Triton.
        """
        try:
            request.validate()
        except ValueError as exc:
            err = RankerUnavailable(f"invalid recommend request: {exc}")
            err.retriable = False
            raise err from exc
        if request.size == 0:
            none = np.zeros((0, request.k), np.int32)
            return Ranked(TopK(none, none.astype(np.float32), none, none, none), "")

        async def one(part: RecommendRequest) -> tuple[dict[str, npt.NDArray[Any]], str]:
            arrays = part.arrays()
            inputs = [_to_input(name, arrays[name.lower()]) for name in TRITON_INPUTS]
            result = await self._infer(
                self.ranker_model, inputs, list(TRITON_OUTPUTS), model_version
            )
            outs = {name.lower(): result.as_numpy(name) for name in TRITON_OUTPUTS}
            if any(o is None or o.shape[0] != part.size or o.ndim != 2 for o in outs.values()):
                shapes = {k: None if o is None else o.shape for k, o in outs.items()}
                raise RankerUnavailable(
                    f"{self.ranker_model} returned outputs of shapes {shapes}, "
                    f"expected [{part.size}, k]"
                )
            version = str(result.get_response().model_version)
            return {k: o[:, : part.k] for k, o in outs.items() if o is not None}, version

        step = RANKER_MAX_BATCH
        parts = await _gather_all(
            [one(request.rows(start, start + step)) for start in range(0, request.size, step)]
        )
        top = TopK(**{k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]})
        # Chunks could straddle a version swap; report the newest that answered.
        version = max((p[1] for p in parts), key=lambda v: (len(v), v))
        return Ranked(top, version)

    async def _infer(
        self,
        model: str,
        inputs: list[grpcclient.InferInput],
        outputs: list[str],
        version: str = "",
    ) -> Any:
        if self._servers is not None:
            return await self._servers.infer(model, inputs, outputs, version)
        if not self.breaker.allow():
            raise RankerUnavailable(f"Triton {model} at {self.url}: circuit open, not called")
        try:
            result = await self._infer_with_retry(model, inputs, outputs, version)
        except RankerUnavailable as exc:
            # An invalid request still proves the server is alive.
            if exc.retriable:
                self.breaker.record_failure()
            else:
                self.breaker.record_success()
            raise
        except BaseException:
            # Cancelled mid-call: count it, or a half-open probe would never end.
            self.breaker.record_failure()
            raise
        self.breaker.record_success()
        return result

    async def _infer_with_retry(
        self,
        model: str,
        inputs: list[grpcclient.InferInput],
        outputs: list[str],
        version: str = "",
    ) -> Any:
        requested = [grpcclient.InferRequestedOutput(name) for name in outputs]

        async def once() -> Any:
            try:
                return await self._client.infer(
                    model,
                    inputs,
                    model_version=version,
                    outputs=requested,
                    client_timeout=self.timeout_s,
                )
            except InferenceServerException as exc:
                if _status(exc) == "UNAVAILABLE":
                    raise _Unavailable(exc) from exc
                raise

        try:
            return await retry(
                f"triton {model}",
                once,
                attempts=_RETRY_ATTEMPTS,
                base_s=_RETRY_BASE_S,
                cap_s=_RETRY_CAP_S,
            )
        except _Unavailable as exc:
            raise RankerUnavailable(
                f"Triton {model} at {self.url} unavailable after {_RETRY_ATTEMPTS} attempts: "
                f"{exc.cause.message()}"
            ) from exc
        except InferenceServerException as exc:
            status = _status(exc) or "client error"
            what = (
                f"timed out after {self.timeout_s:g} s"
                if status == "DEADLINE_EXCEEDED"
                else f"failed ({status}): {exc.message()}"
            )
            err = RankerUnavailable(f"Triton {model} at {self.url} {what}")
            if status in ("INVALID_ARGUMENT", "client error"):
                err.retriable = False
            raise err from exc


@dataclass(eq=False)
class _Server:
    client: RankerClient
    in_flight: int = 0


class _Servers:
    """Several Triton servers behind one :class:`RankerClient` (its ``_client`` for readiness
    and closing; its ``_infer`` routes through :meth:`infer`)."""

    def __init__(self, clients: Sequence[RankerClient]) -> None:
        self.servers = [_Server(c) for c in clients]
        self._next = 0  # round-robin start among equally busy servers

    def _pick(self, tried: Sequence[_Server]) -> _Server | None:
        """The least busy server not tried yet whose breaker lets a call through now."""
        n = len(self.servers)
        best: tuple[int, int, int] | None = None
        for i, server in enumerate(self.servers):
            if server in tried or not server.client.breaker.available():
                continue
            rank = (server.in_flight, (i - self._next) % n, i)
            if best is None or rank < best:
                best = rank
        if best is None:
            return None
        self._next = best[2] + 1
        return self.servers[best[2]]

    async def infer(
        self,
        model: str,
        inputs: list[grpcclient.InferInput],
        outputs: list[str],
        version: str = "",
    ) -> Any:
        """``model`` (``version``, or the served one) on one server, and once more on
        another if that one fails."""
        tried: list[_Server] = []
        errors: list[RankerUnavailable] = []
        for _ in range(2):
            server = self._pick(tried)
            if server is None:
                break
            tried.append(server)
            server.in_flight += 1
            try:
                return await server.client._infer(model, inputs, outputs, version)
            except RankerUnavailable as exc:
                if not exc.retriable:
                    raise
                errors.append(exc)
            finally:
                server.in_flight -= 1
        urls = ", ".join(s.client.url for s in self.servers)
        if not errors:
            raise RankerUnavailable(f"Triton {model}: every server's circuit is open ({urls})")
        raise RankerUnavailable(
            f"Triton {model}: no server answered ({'; '.join(map(str, errors))})"
        ) from errors[-1]

    async def _any(self, ask: Callable[[Any], Awaitable[bool]]) -> bool:
        """True when any server says yes; a server's error counts as no, unless all fail."""
        answers = await asyncio.gather(
            *(ask(s.client._client) for s in self.servers), return_exceptions=True
        )
        if any(a is True for a in answers):
            return True
        failed = [a for a in answers if isinstance(a, BaseException)]
        if len(failed) == len(answers):
            raise failed[0]
        return False

    async def is_server_ready(self, client_timeout: float) -> bool:
        return await self._any(lambda c: c.is_server_ready(client_timeout=client_timeout))

    async def is_model_ready(self, name: str, version: str = "", *, client_timeout: float) -> bool:
        return await self._any(
            lambda c: c.is_model_ready(name, version, client_timeout=client_timeout)
        )

    async def close(self) -> None:
        await asyncio.gather(*(s.client.close() for s in self.servers))


def _channel_args() -> list[tuple[str, int]]:
    """tritonclient's own channel options, plus a short reconnect backoff.

    gRPC backs off reconnecting to a dead server up to 120 s by default and
    fails every call meanwhile with the cached "connection refused", so a
    restarted Triton would stay unused for minutes.  The breaker decides how
    often calls go out; the channel only has to be ready when they do.
    """
    keepalive = grpcclient.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", int(keepalive.keepalive_permit_without_calls)),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]


async def _gather_all(calls: Sequence[Awaitable[T]]) -> list[T]:
    """Run ``calls`` concurrently; if any fails, wait for all, then raise the first error.

    Waiting (rather than cancelling) keeps no request in flight behind the
    caller's back; each is bounded by the client timeout anyway.
    """
    if len(calls) == 1:
        return [await calls[0]]
    results = await asyncio.gather(*calls, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return [r for r in results if not isinstance(r, BaseException)]
