"""The ranker's item table fed from a real redis-server by the follower thread.

What Triton's ``fused_ranker`` relies on: items written to Redis reach the table within
a few intervals without the scoring side doing any I/O; a Redis outage leaves the table
serving and the thread recovers on its own; ``close`` stops the thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import redis

from features import keys
from features.item_table import ItemLogFollower, ItemTable
from infra import procs
from infra.redis_server import RedisServer

pytestmark = pytest.mark.integration

DIM = keys.EMB_DIM
INTERVAL_S = 0.05


@dataclass
class RedisProc:
    server: RedisServer
    proc: procs.Proc | None = None

    def start(self) -> None:
        self.proc = self.server.start()
        procs.wait_until(self.server.ready, 20, "redis", self.server.log_path, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop(self.proc)
            self.proc = None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProc]:
    rp = RedisProc(RedisServer(tmp_path_factory.mktemp("redis"), procs.free_port()))
    rp.start()
    try:
        yield rp
    finally:
        rp.stop()


@pytest.fixture
def r(server: RedisProc) -> Iterator[redis.Redis]:
    if server.proc is None:
        server.start()
    client = redis.Redis.from_url(server.server.url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def follower(server: RedisProc) -> Iterator[ItemLogFollower]:
    f = ItemLogFollower.from_url(server.server.url, interval_s=INTERVAL_S, max_backoff_s=0.4)
    yield f
    f.close()


def vec(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


def number(r: redis.Redis, item_id: str) -> int:
    """The item's number as ``features.catalog`` assigns it: once, from ``items:seq``
    (the table is keyed by number and skips an item without one)."""
    got = r.hget(keys.item(item_id), "n")
    return int(got) if got is not None else int(r.incr(keys.ITEM_SEQ)) - 1  # type: ignore[arg-type]


def write(r: redis.Redis, items: dict[str, np.ndarray | None], in_stock: str = "1") -> None:
    pipe = r.pipeline(transaction=False)
    for item_id, emb in items.items():
        fields: dict[str, str | bytes] = {
            "title": item_id,
            "in_stock": in_stock,
            "n": str(number(r, item_id)),
        }
        if emb is not None:
            fields["emb"] = emb.astype("<f4").tobytes()
        else:  # as features.catalog does: a record without text keeps no stale embedding
            pipe.hdel(keys.item(item_id), "emb")
        pipe.hset(keys.item(item_id), mapping=fields)  # type: ignore[arg-type]
        pipe.xadd(keys.ITEM_LOG, {"id": item_id})
    pipe.execute()


def delete(r: redis.Redis, item_id: str) -> None:
    r.delete(keys.item(item_id))
    r.xadd(keys.ITEM_LOG, {"id": item_id})


def last_log_id(r: redis.Redis) -> bytes:
    ((entry_id, _),) = r.xrevrange(keys.ITEM_LOG, count=1)
    return bytes(entry_id)


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout_s, f"timed out waiting for {what}"
        time.sleep(0.01)
    return time.monotonic() - start


def assert_holds(table: ItemTable, items: dict[str, np.ndarray]) -> None:
    mat, has = table.lookup(list(items))
    assert has.all()
    want = np.stack([v / np.linalg.norm(v) for v in items.values()])
    np.testing.assert_allclose(mat, want, atol=1e-6)


def test_refresh_from_redis_reads_the_whole_log_then_only_changes(r: redis.Redis) -> None:
    write(r, {f"i{k}": vec(k) if k % 2 else None for k in range(7)})
    t = ItemTable()
    assert t.catch_up(r, max_entries=3) == 7
    assert len(t) == 7 and t.last_stream_id == last_log_id(r)
    assert list(t.lookup(["i0", "i1"])[1]) == [False, True]

    write(r, {"i1": None}, in_stock="0")
    delete(r, "i2")
    delete(r, "never-existed")
    assert t.refresh_from_redis(r) == 3
    assert "i2" not in t and len(t) == 6
    assert not t.lookup(["i1"])[1][0] and not t.in_stock(["i1"])[0]
    assert t.refresh_from_redis(r) == 0


def test_items_reach_the_table_without_scoring_side_io(
    server: RedisProc, r: redis.Redis, follower: ItemLogFollower
) -> None:
    write(r, {"old": vec(0)})
    table = ItemTable()
    assert follower.catch_up(table) == 1
    follower.start()
    assert follower.running
    items = {f"n{k}": vec(k) for k in range(1, 301)}
    write(r, items)
    # The thread reads on its own; the scoring side only checks what it has prepared.
    wait_for(lambda: follower.pending == len(items), 20 * INTERVAL_S + 5, "the follower's read")
    assert len(table) == 1, "nothing reaches the table before the scoring side applies it"
    last = last_log_id(r)
    server.stop()  # applying must not need Redis
    assert follower.apply_pending(table) == len(items)
    assert len(table) == 301 and table.last_stream_id == last
    assert_holds(table, items)
    assert follower.apply_pending(table) == 0


def test_outage_keeps_the_table_serving_and_the_thread_recovers(
    server: RedisProc, r: redis.Redis, follower: ItemLogFollower, caplog: pytest.LogCaptureFixture
) -> None:
    known = {"a": vec(1), "b": vec(2)}
    write(r, known)
    table = ItemTable()
    assert follower.catch_up(table) == 2
    with caplog.at_level(logging.WARNING, logger="features.item_table"):
        follower.start()
        r.save()  # this outage keeps the data (a restart that loses it: the next test)
        server.stop()
        wait_for(lambda: not follower.healthy, 5, "the follower to notice the outage")
        time.sleep(1.0)  # several backoff periods
        assert follower.apply_pending(table) == 0
        assert_holds(table, known)
        assert follower.running, "the thread survives the outage"

        server.start()  # from the snapshot: a, b and items:seq as they were
        (server.server.workdir / "dump.rdb").unlink()
        fresh = redis.Redis.from_url(server.server.url)
        try:
            write(fresh, {"c": vec(3)})
        finally:
            fresh.close()
        took = wait_for(lambda: follower.pending > 0, 5, "the item written after recovery")
    assert took < 0.4 + 1.0, "back within one capped backoff period (0.4 s) and a read"
    assert follower.apply_pending(table) == 1
    assert_holds(table, {**known, "c": vec(3)})
    assert follower.healthy
    assert sum("Redis unavailable" in m for m in caplog.messages) == 1, caplog.messages
    assert sum("Redis back" in m for m in caplog.messages) == 1, caplog.messages


def test_a_redis_that_lost_its_data_is_noticed_and_the_table_reloaded(
    server: RedisProc, r: redis.Redis, follower: ItemLogFollower, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis restarted without persistence: items:seq starts again at 0, so the first item
    sent again gets a's number.  The follower (Triton's) notices the counter going down
    and starts over: the table holds what this Redis holds, under its numbers."""
    write(r, {"a": vec(1), "b": vec(2)})
    table = ItemTable()
    assert follower.catch_up(table) == 2
    table.take_changed()
    follower.start()
    server.stop()
    server.start()
    fresh = redis.Redis.from_url(server.server.url)
    try:
        with caplog.at_level(logging.WARNING, logger="features.item_table"):
            write(fresh, {"c": vec(3)})
            wait_for(lambda: follower.pending > 0, 5, "the item written after the restart")
        assert int(fresh.hget(keys.item("c"), "n")) == 0  # type: ignore[arg-type]
    finally:
        fresh.close()
    assert follower.apply_pending(table) == 1
    assert_holds(table, {"c": vec(3)})
    assert len(table) == 1 and "a" not in table and "b" not in table
    assert table.id_of([0, 1]) == ["c", None]
    assert set(table.take_changed().tolist()) == {0, 1}, "what derives from rows 0, 1 is redone"
    assert any("items:seq went back" in m for m in caplog.messages), caplog.messages


async def test_the_workers_item_index_reloads_after_redis_lost_its_data(r: redis.Redis) -> None:
    """The worker's side of the same: its ItemIndex reads the counter before the log."""
    from redis.asyncio import Redis as AsyncRedis

    from features.item_index import ItemIndex

    client = AsyncRedis.from_url(_url(r))
    try:
        index = ItemIndex(client)
        write(r, {"a": vec(1), "b": vec(2)})
        assert await index.refresh() == 2
        r.flushdb()  # what a restart without persistence leaves
        write(r, {"c": vec(3)})
        await index.refresh()
        assert len(index.table) == 1 and index.table.id_of([0]) == ["c"]
        found = [i for i, _ in index.nearest(vec(1)[None, :] / np.linalg.norm(vec(1)), 5)[0]]
        assert found == ["c"], found
    finally:
        await client.aclose()


def _url(r: redis.Redis) -> str:
    kw = r.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}"


def test_a_burst_is_read_back_to_back_and_coalesced_when_nobody_applies(
    server: RedisProc, r: redis.Redis
) -> None:
    follower = ItemLogFollower.from_url(
        server.server.url, interval_s=10.0, max_entries=40, max_pending=1
    )
    try:
        write(r, {f"x{k}": vec(k) for k in range(100)})
        # Full reads ask for the next at once; the last, partial one waits an interval.
        assert [follower.poll_once() for _ in range(3)] == [0.0, 0.0, 10.0]
        delete(r, "x5")
        write(r, {"x6": vec(1006)}, in_stock="0")
        assert follower.poll_once() == 10.0
        # Four reads, 102 log entries; kept: one change per item, x5's as a removal.
        assert follower.pending == 100
        table = ItemTable()
        follower.apply_pending(table)
        direct = ItemTable()
        direct.catch_up(r)
        assert sorted(table.ids) == sorted(direct.ids) and "x5" not in table
        np.testing.assert_array_equal(table.lookup(direct.ids)[0], direct.lookup(direct.ids)[0])
        assert not table.in_stock(["x6"])[0]
        assert table.last_stream_id == direct.last_stream_id == last_log_id(r)
    finally:
        follower.close()


def test_close_stops_the_thread_promptly(server: RedisProc, r: redis.Redis) -> None:
    follower = ItemLogFollower.from_url(server.server.url, interval_s=30.0)
    follower.catch_up(ItemTable())
    follower.start()
    assert follower.running
    start = time.monotonic()
    assert follower.close(timeout_s=2.0) is True
    assert time.monotonic() - start < 1.0, "a sleeping follower wakes up to stop"
    assert not follower.running
    with pytest.raises(RuntimeError):
        follower.start()
