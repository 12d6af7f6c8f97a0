"""The one way shoprec processes open Redis, so every client is configured alike.

redis-py 8's default protocol (RESP3) stays: RESP2 was measured no cheaper for the
worker's read (``bench/redis_protocol.py``: 157 vs 149 CPU-us per user for RESP2 vs
RESP3, rees46-sample, batches of 32; bench/results/ablation/redis-protocol.json).

With ``cluster`` (``SHOPREC_REDIS_CLUSTER``) the client is redis-py's Redis Cluster
client: the URL names one node or several (``redis://h1:p1,h2:p2/0``), the client
learns the others and the slot map from the first that answers (name several: a client
started while the one named node is down cannot find the cluster), splits every
pipeline by node (one round trip per node, concurrently) and follows MOVED replies
after a failover.  Callers keep the plain client's commands; two things
differ and live here:

* redis-py refuses scripts (EVALSHA) inside a cluster pipeline; :class:`ScriptRunner`
  runs a batch of script calls as one pipeline per primary instead, and keeps the
  replies of the nodes that answered when another fails;
* a multi-key command must stay in one hash slot (``features.keys``: the ``{u:<id>}``
  and ``{i:<id>}`` tags); the client raises on a script whose keys do not, so a
  cross-slot script fails loudly in the cluster tests instead of corrupting state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any, cast

import redis
from pydantic import SecretStr
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.cluster import ClusterNode as SyncClusterNode
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ClusterCrossSlotError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    SlotNotCoveredError,
)

from shoprec.errors import describe
from shoprec.retry import RETRIABLE, backoff_s

log = logging.getLogger("shoprec.redis")

# (script, keys, args): one script call of a batch.
ScriptCall = tuple[AsyncScript, Sequence[str], Sequence[Any]]


def _raw(url: SecretStr | str) -> str:
    return url.get_secret_value() if isinstance(url, SecretStr) else url


def split_nodes(url: str) -> tuple[str, list[tuple[str, int]]]:
    """A URL naming several nodes, ``redis://[auth@]h1:p1,h2:p2[/db][?options]``, as the
    URL of its first node and every node's ``(host, port)``; a one-node URL gives itself
    and that node."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        # Not the URL itself in the message: it may carry a password.
        raise ValueError("the Redis URL does not start with redis:// or rediss://")
    auth, at, located = rest.rpartition("@")
    cut = min((i for i in (located.find("/"), located.find("?")) if i >= 0), default=len(located))
    hosts, tail = located[:cut], located[cut:]
    nodes = []
    for part in hosts.split(","):
        host, colon, port = part.strip().rpartition(":")
        if not colon or not port.isdigit():
            host, port = part.strip(), "6379"
        nodes.append((host.strip("[]"), int(port)))
    first = f"{scheme}://{auth}{at}{hosts.split(',')[0].strip()}{tail}"
    return first, nodes


def open_redis(
    url: SecretStr | str,
    *,
    cluster: bool = False,
    timeout_s: float = 5.0,
    max_connections: int | None = None,
) -> Redis:
    """An async client for ``url`` (redis:// or rediss://; connects on first use).

    ``timeout_s`` bounds every socket read: the worker's hot path wants seconds, bulk
    jobs (rebuild, verify) a minute.  ``cluster`` (``settings.redis_cluster``) opens
    the Redis Cluster client; ``max_connections`` is then per node.  It is typed as
    :class:`Redis` because every caller uses only the commands both clients have.
    """
    if cluster:
        first, nodes = split_nodes(_raw(url))
        # The cluster client has every command the callers use; it is not a subclass.
        return cast(
            Redis,
            RedisCluster.from_url(
                first,
                startup_nodes=[ClusterNode(host, port) for host, port in nodes[1:]] or None,
                socket_timeout=timeout_s,
                # Per node; redis-py's cluster default is 2**31.
                max_connections=max_connections or 2**31,
            ),
        )
    if "," in _raw(url).partition("://")[2].partition("/")[0]:
        raise ValueError(
            "a Redis URL names several nodes only for a cluster (SHOPREC_REDIS_CLUSTER)"
        )
    return Redis.from_url(
        _raw(url),
        socket_timeout=timeout_s,
        max_connections=max_connections,
    )


def open_sync_redis(
    url: SecretStr | str, *, cluster: bool = False, timeout_s: float = 1.0, retries: bool = True
) -> redis.Redis:
    """A synchronous client (Triton's item-table follower), raw bytes, bounded timeouts.

    ``retries=False`` turns off redis-py's own retries (its default retries a failed
    command with backoff), for a caller that spaces its retries itself.  A cluster
    client still follows MOVED replies and refreshes its slot map after a failover; it is
    built on first use, so a cluster that is down now only fails the calls.
    """
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "decode_responses": False,
    }
    if not retries:
        options["retry"] = Retry(NoBackoff(), 0)
    if cluster:
        return cast(redis.Redis, _LazySyncCluster(_raw(url), options))
    return redis.Redis.from_url(_raw(url), **options)


class _LazySyncCluster:
    """redis-py's sync Redis Cluster client, made on first use.

    That client reads the slot map while it is built, so it cannot be built while Redis is
    down; a Triton started then would fail to load its model, where the item-table
    follower is meant to serve and retry.  Until it can be built, every use raises
    ``redis.ConnectionError`` (a ``RedisError``, which the follower handles).
    """

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        self._url = url
        self._options = options
        self._client: redis.RedisCluster | None = None

    def _get(self) -> redis.RedisCluster:
        if self._client is None:
            try:
                first, nodes = split_nodes(self._url)
                self._client = redis.RedisCluster.from_url(
                    first,
                    startup_nodes=[
                        SyncClusterNode(h, p)  # type: ignore[no-untyped-call]
                        for h, p in nodes[1:]
                    ]
                    or None,
                    **self._options,
                )
            except RedisClusterException as exc:
                raise redis.ConnectionError(str(exc)) from exc
        return self._client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def is_cluster(client: object) -> bool:
    """Whether ``client`` is redis-py's (async or sync) Redis Cluster client."""
    return isinstance(client, RedisCluster | redis.RedisCluster | _LazySyncCluster)


class ScriptRunner:
    """Runs a batch of script calls in one round trip: one pipeline on a single Redis, one
    per primary on a Redis Cluster, where a failing node takes only its own calls with it.

    redis-py refuses scripts in its cluster pipeline, and that pipeline answers a node's
    failure by closing every connection of the client and, after its own retries, raising
    for the whole batch, though the other nodes ran their part: sending the batch again
    would report those events as duplicates.  Here each node's calls are one pipeline on
    that node's connections (``ClusterNode.execute_pipeline``); replies of the nodes that
    answered are kept, and the calls of a node that did not, or that no longer serves the
    slot (MOVED after a failover), are sent again, with backoff, once the slot map has been
    read again, until they run (or fail with a non-retriable error).  A node that answers
    NOSCRIPT (a promoted replica starts with no scripts) gets the script loaded, and those
    calls, which did not run, are sent again.  The one call that can run twice is one
    whose node died after running it and before replying: the update script's dedupe then
    reports it as a duplicate, and state still holds it once.
    """

    def __init__(self, client: Redis) -> None:
        self._client = client
        self._cluster = is_cluster(client)

    async def run(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """The calls' replies in order; every key of one call must share a hash slot."""
        if not calls:
            return []
        if not self._cluster:
            async with self._client.pipeline(transaction=False) as pipe:
                for script, keys, args in calls:
                    await script(keys=keys, args=args, client=pipe)
                replies: list[Any] = await pipe.execute()
            return replies
        return await self._run_on_cluster(calls)

    async def _run_on_cluster(self, calls: Sequence[ScriptCall]) -> list[Any]:
        cluster: Any = self._client
        await cluster.initialize()  # no-op once the slot map is known
        out: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        attempt = 0
        while todo:
            groups: dict[str, tuple[Any, list[int]]] = {}
            again: list[int] = []
            failures: list[BaseException] = []
            for i in todo:
                keys = calls[i][1]
                if not keys or len({cluster.keyslot(k) for k in keys}) != 1:
                    raise ClusterCrossSlotError(
                        f"script keys {list(keys)} do not share one hash slot "
                        "(give them one {tag}: features.keys)"
                    )
                try:
                    node = cluster.get_node_from_key(keys[0])
                except SlotNotCoveredError as exc:  # no primary for it until a failover ends
                    again.append(i)
                    failures.append(exc)
                    continue
                groups.setdefault(node.name, (node, []))[1].append(i)
            sent = await asyncio.gather(
                *(self._on_node(node, [calls[i] for i in idx]) for node, idx in groups.values()),
                return_exceptions=True,
            )
            for (_, idx), replies in zip(groups.values(), sent, strict=True):
                if isinstance(replies, BaseException):
                    if not _node_down(replies):
                        raise replies
                    again += idx
                    failures.append(replies)
                    continue
                for i, reply in zip(idx, replies, strict=True):
                    if isinstance(reply, BaseException):
                        if not _node_down(reply):
                            raise reply
                        again.append(i)
                        failures.append(reply)
                    else:
                        out[i] = reply
            if not again:
                return out
            attempt += 1
            # A dead node refuses at once, and a failover takes seconds: retry within one.
            delay = backoff_s(attempt, cap_s=1.0)
            log.warning(
                "Redis Cluster: %d of %d script calls not run (%s); sent again in %.2f s",
                len(again),
                len(calls),
                describe(failures[0]),
                delay,
            )
            await asyncio.sleep(delay)
            # A failover moved slots: read the map again before routing the calls anew.
            with contextlib.suppress(*RETRIABLE):
                await cluster.nodes_manager.initialize()
            todo = again
        return out

    async def _on_node(self, node: Any, calls: Sequence[ScriptCall]) -> list[Any]:
        """One pipeline of ``calls`` on ``node``; loads a script the node lacks and sends the
        calls that found none again.  Replies in order (an error reply as its exception)."""
        commands = [
            PipelineCommand(k, "EVALSHA", script.sha, len(keys), *keys, *args)
            for k, (script, keys, args) in enumerate(calls)
        ]
        await node.execute_pipeline(commands)
        missing = [c for c in commands if isinstance(c.result, NoScriptError)]
        if missing:
            for script in {
                calls[c.position][0].sha: calls[c.position][0] for c in missing
            }.values():
                load = PipelineCommand(0, "SCRIPT", "LOAD", script.script)
                await node.execute_pipeline([load])
                if isinstance(load.result, BaseException):
                    raise load.result
            retry = [PipelineCommand(c.position, *c.args) for c in missing]
            await node.execute_pipeline(retry)
            for c in retry:
                commands[c.position].result = c.result
        return [c.result for c in commands]


def _node_down(exc: BaseException) -> bool:
    """A node that failed, or no longer serves the slot: send its calls again later."""
    return isinstance(
        exc,
        (*RETRIABLE, MovedError),
    )


async def send_commands(client: Redis, commands: Sequence[tuple[Any, ...]]) -> None:
    """Many single-key commands (the key is each one's second word) in one round trip, one
    per node on a Redis Cluster, packed by hiredis in C (redis-py's packer is pure Python:
    for millions of members it, not Redis, was the slowest part); the first error reply is
    raised."""
    import hiredis

    async def on(acquire: Any, release: Any, part: Sequence[tuple[Any, ...]]) -> None:
        payload = b"".join(hiredis.pack_command(c) for c in part)
        conn = await acquire()
        try:
            await conn.send_packed_command(payload)
            replies = [await conn.read_response(disable_decoding=True) for _ in part]
        finally:
            await release(conn)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply

    if not is_cluster(client):
        pool = client.connection_pool
        await on(pool.get_connection, pool.release, commands)
        return
    cluster: Any = client
    await cluster.initialize()
    by_node: dict[str, tuple[Any, list[tuple[Any, ...]]]] = {}
    for command in commands:
        node = cluster.get_node_from_key(command[1])
        by_node.setdefault(node.name, (node, []))[1].append(command)

    def node_calls(node: Any) -> tuple[Any, Any]:
        async def acquire() -> Any:
            return node.acquire_connection()

        async def release(conn: Any) -> None:
            node.release(conn)

        return acquire, release

    await asyncio.gather(*(on(*node_calls(node), part) for node, part in by_node.values()))
