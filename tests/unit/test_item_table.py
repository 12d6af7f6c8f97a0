"""The ranker's item table: the pure parts, and the refresh logic against a fake Redis."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import redis

from features import keys
from ranking.item_table import (
    ItemRecord,
    ItemTable,
    ItemTableRefresher,
    parse_item_hash,
    parse_log_entries,
)

D = 4


def vec(*xs: float) -> np.ndarray:
    v = np.zeros(D, np.float32)
    v[: len(xs)] = xs
    return v


def test_upsert_lookup_normalises_and_marks_unknown() -> None:
    t = ItemTable(dim=D, capacity=1)
    t.upsert(["a", "b"], np.stack([vec(3, 4), vec(0, 2)]))
    mat, has = t.lookup(["b", "zzz", "a", b"a"])
    np.testing.assert_allclose(mat, [vec(0, 1), vec(), vec(0.6, 0.8), vec(0.6, 0.8)], atol=1e-6)
    assert list(has) == [True, False, True, True]
    assert len(t) == 2 and "a" in t and "zzz" not in t


def test_upsert_replaces_and_text_less_rows_are_zero() -> None:
    t = ItemTable(dim=D)
    t.upsert(["a", "b", "c"], np.stack([vec(1), vec(0, 1), vec()]), has_emb=[True, False, True])
    t.upsert(["a"], [vec(0, 0, 1)], in_stock=[False])
    mat, has = t.lookup(["a", "b", "c"])
    np.testing.assert_allclose(mat[0], vec(0, 0, 1))
    assert list(has) == [True, False, False], "a zero vector counts as no embedding"
    assert (mat[1:] == 0).all()
    assert list(t.in_stock(["a", "b", "nope"])) == [False, True, False]
    with pytest.raises(ValueError, match="shape"):
        t.upsert(["x"], np.zeros((1, D + 1)))


def test_grows_by_doubling_and_remove_keeps_rows_dense() -> None:
    t = ItemTable(dim=D, capacity=2)
    ids = [f"i{k}" for k in range(100)]
    embs = np.eye(D, dtype=np.float32)[np.arange(100) % D] * (1 + np.arange(100)[:, None])
    t.upsert(ids, embs)
    assert len(t) == 100
    assert t.remove(["i0", "i50", "missing", "i50"]) == 2
    assert len(t) == 98 and "i0" not in t and t.ids[0] == "i99"
    mat, has = t.lookup(["i99", "i1", "i0", "i51"])
    np.testing.assert_allclose(mat[0], np.eye(D)[99 % D])
    np.testing.assert_allclose(mat[1], np.eye(D)[1])
    assert list(has) == [True, True, False, True]
    t.remove(t.ids)
    assert len(t) == 0 and not t.lookup(["i1"])[1].any()
    t.upsert(["again"], [vec(1)])
    assert t.lookup(["again"])[1][0]


def test_apply_upserts_and_removes() -> None:
    t = ItemTable(dim=D)
    t.upsert(["gone", "stays"], [vec(1), vec(0, 1)])
    t.apply(
        {
            "gone": None,
            "new": ItemRecord(emb=vec(0, 0, 1)),
            "plain": ItemRecord(emb=None, in_stock=False),
        }
    )
    assert sorted(t.ids) == ["new", "plain", "stays"]
    _, has = t.lookup(["new", "plain", "stays"])
    assert list(has) == [True, False, True]
    assert list(t.in_stock(["new", "plain"])) == [True, False]


def test_parse_log_entries_dedupes_in_order() -> None:
    entries = [
        (b"1-0", {b"id": b"a"}),
        (b"2-0", {b"id": b"b"}),
        (b"3-0", {b"other": b"x"}),
        (b"4-0", {b"id": b"a"}),
    ]
    assert parse_log_entries(entries) == (b"4-0", ["a", "b"])
    assert parse_log_entries([]) == (None, [])


def test_parse_item_hash() -> None:
    raw = vec(1, 2).astype("<f4").tobytes()
    rec = parse_item_hash(raw, b"1", D)
    assert rec.in_stock and rec.emb is not None and rec.emb.tolist() == [1, 2, 0, 0]
    assert parse_item_hash(None, b"0", D) == ItemRecord(emb=None, in_stock=False)
    assert parse_item_hash(None, b"false", D).in_stock is False
    assert parse_item_hash(None, None, D).in_stock is True
    assert parse_item_hash(b"\x00" * 7, b"true", D).emb is None, "wrong size = no embedding"
    nan = np.full(D, np.nan, np.float32).tobytes()
    assert parse_item_hash(nan, b"1", D).emb is None


# --- refresh, against a fake synchronous Redis ------------------------------------------


class FakeRedis:
    """Just what ItemTable.refresh_from_redis uses: XREAD, pipelined EXISTS/HMGET."""

    def __init__(self) -> None:
        self.log: list[tuple[bytes, dict[bytes, bytes]]] = []
        self.hashes: dict[str, dict[str, bytes]] = {}
        self.down = False
        self.xreads = 0

    def put(self, item_id: str, emb: np.ndarray | None, in_stock: bytes = b"1") -> None:
        h = {"in_stock": in_stock}
        if emb is not None:
            h["emb"] = emb.astype("<f4").tobytes()
        self.hashes[keys.item(item_id)] = h
        self.log.append((f"{len(self.log) + 1}-0".encode(), {b"id": item_id.encode()}))

    def delete(self, item_id: str) -> None:
        self.hashes.pop(keys.item(item_id), None)
        self.log.append((f"{len(self.log) + 1}-0".encode(), {b"id": item_id.encode()}))

    def xread(self, streams: dict[str, bytes], count: int) -> Any:
        self.xreads += 1
        if self.down:
            raise redis.ConnectionError("connection refused")
        ((name, after),) = streams.items()
        assert name == keys.ITEM_LOG
        seq = int(after.split(b"-")[0])
        new = self.log[seq : seq + count]
        return [[name.encode(), new]] if new else []

    def pipeline(self, transaction: bool) -> FakePipe:
        return FakePipe(self)

    def close(self) -> None:
        pass


class FakePipe:
    def __init__(self, r: FakeRedis) -> None:
        self.r, self.calls = r, []  # type: list[Any]

    def exists(self, key: str) -> None:
        self.calls.append(int(key in self.r.hashes))

    def hmget(self, key: str, fields: list[str]) -> None:
        h = self.r.hashes.get(key, {})
        self.calls.append([h.get(f) for f in fields])

    def execute(self) -> list[Any]:
        if self.r.down:
            raise redis.ConnectionError("connection refused")
        return self.calls


def test_refresh_reads_whole_log_then_only_changes() -> None:
    r = FakeRedis()
    for k in range(7):
        r.put(f"i{k}", vec(1, k) if k % 2 else None)
    t = ItemTable(dim=D)
    assert t.catch_up(r, max_entries=3) == 7  # type: ignore[arg-type]
    assert len(t) == 7 and t.last_stream_id == b"7-0"
    assert list(t.lookup(["i0", "i1"])[1]) == [False, True]

    r.put("i1", None, in_stock=b"0")
    r.delete("i2")
    r.delete("never-existed")
    assert t.refresh_from_redis(r) == 3  # type: ignore[arg-type]
    assert "i2" not in t and len(t) == 6
    assert not t.lookup(["i1"])[1][0] and not t.in_stock(["i1"])[0]
    assert t.refresh_from_redis(r) == 0  # type: ignore[arg-type]


def test_refresher_throttles_survives_outage_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    r = FakeRedis()
    r.put("a", vec(1))
    t = ItemTable(dim=D)
    ref = ItemTableRefresher(t, r, interval_s=0.5, max_backoff_s=2.0, clock=lambda: now[0])  # type: ignore[arg-type]
    assert ref.catch_up() == 1 and "a" in t
    reads = r.xreads
    assert ref.maybe_refresh() == 0 and r.xreads == reads, "not due yet"

    r.put("b", vec(0, 1))
    now[0] += 0.6
    assert ref.maybe_refresh() == 1 and "b" in t

    r.down = True
    with caplog.at_level(logging.WARNING, logger="ranking.item_table"):
        for _ in range(6):
            now[0] += 0.6
            assert ref.maybe_refresh() == 0
    assert not ref.healthy and len(t) == 2, "keeps serving what it has"
    assert sum("unavailable" in m for m in caplog.messages) == 1
    assert r.xreads - reads < 1 + 6, "backs off while Redis is down"

    r.down = False
    r.put("c", vec(0, 0, 1))
    now[0] += 2.1
    assert ref.maybe_refresh() == 1 and ref.healthy and "c" in t


def test_from_url_does_not_retry_or_hang_when_redis_is_down() -> None:
    import time

    ref = ItemTableRefresher.from_url(ItemTable(dim=D), "redis://127.0.0.1:1/0")
    start = time.monotonic()
    assert ref.catch_up() == 0
    assert ref.maybe_refresh() == 0
    assert time.monotonic() - start < 1.0
    ref.close()
