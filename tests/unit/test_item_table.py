"""The ranker's item table, its pure parts.

The Redis side runs against a real server in tests/integration/test_item_log_follower.py.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from features.item_table import (
    ItemChanges,
    ItemLogFollower,
    ItemRecord,
    ItemTable,
    SeqWatch,
    coalesce,
    parse_item_hash,
    parse_log_entries,
    retry_delay,
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


def test_rows_are_item_numbers_that_grow_and_are_never_reused() -> None:
    t = ItemTable(dim=D, capacity=2)
    ids = [f"i{k}" for k in range(100)]
    embs = np.eye(D, dtype=np.float32)[np.arange(100) % D] * (1 + np.arange(100)[:, None])
    nums = t.upsert(ids, embs)
    assert nums.tolist() == list(range(100)) and len(t) == 100 and t.size == 100
    assert t.remove(["i0", "i50", "missing", "i50"]) == 2
    assert len(t) == 98 and "i0" not in t and t.id_of([0, 50, 99, -1]) == [None, None, "i99", None]
    mat, has = t.lookup(["i99", "i1", "i0", "i51"])
    np.testing.assert_allclose(mat[0], np.eye(D)[99 % D])
    np.testing.assert_allclose(mat[1], np.eye(D)[1])
    assert list(has) == [True, True, False, True]
    assert t.upsert(["again"], [vec(1)]).tolist() == [100], "a number is never reused"
    # Numbers from Redis are kept as given; one the table has not seen reads as unknown.
    assert t.upsert(["far"], [vec(0, 1)], nums=[500]).tolist() == [500]
    assert t.stock([500, 9_999, -1]).tolist() == [True, False, False]
    assert set(t.take_changed().tolist()) == {*range(101), 500}
    assert t.take_changed().size == 0


def test_a_number_given_again_names_only_its_new_item() -> None:
    """A Redis that lost its data hands out numbers again before anyone notices: the
    item that held the number is no longer found under it."""
    t = ItemTable(dim=D)
    t.upsert(["a", "b"], np.stack([vec(1), vec(0, 1)]), nums=[0, 1])
    t.upsert(["c"], [vec(0, 0, 1)], nums=[0])
    assert t.id_of([0, 1]) == ["c", "b"]
    assert t.rows(["a", "b", "c"]).tolist() == [-1, 1, 0]
    assert "a" not in t and len(t) == 2


def test_clear_forgets_every_item_and_reports_every_row_changed() -> None:
    t = ItemTable(dim=D)
    t.upsert(["a", "b"], np.stack([vec(1), vec(0, 1)]), nums=[0, 3])
    t.last_stream_id = b"5-0"
    t.take_changed()
    t.clear()
    assert len(t) == 0 and t.size == 4 and t.last_stream_id == b"0-0"
    assert t.take_changed().tolist() == [0, 1, 2, 3]
    assert t.id_of([0, 3]) == [None, None] and not t.stock([0, 3]).any()
    mat, has = t.lookup(["a", "b"])
    assert not has.any() and not mat.any()
    assert t.upsert(["c"], [vec(1)], nums=[0]).tolist() == [0] and t.id_of([0]) == ["c"]


def test_seq_watch_notices_only_the_counter_going_down() -> None:
    w = SeqWatch()
    assert [w.went_back(r) for r in (None, b"5", b"5", "9", b"2", 2, None)] == [
        False,
        False,
        False,
        False,
        True,
        False,
        True,
    ]


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
    rec = parse_item_hash(raw, b"1", b"7", None, b"phones", dim=D)
    assert rec is not None and rec.in_stock and rec.num == 7 and rec.category == "phones"
    assert rec.emb is not None and rec.emb.tolist() == [1, 2, 0, 0]
    assert parse_item_hash(None, b"0", b"1", dim=D) == ItemRecord(emb=None, in_stock=False, num=1)
    sold_out = parse_item_hash(None, b"false", b"1", dim=D)
    assert sold_out is not None and not sold_out.in_stock
    assert parse_item_hash(raw, None, b"1", raw, dim=D) is None, "a late bemb write is no item"
    assert parse_item_hash(raw, b"1", None, dim=D) is None, "not numbered yet: read it later"
    odd = parse_item_hash(b"\x00" * 7, b"true", b"1", raw, dim=D)
    assert odd is not None and odd.emb is None and odd.bemb is not None, "wrong size = no text"
    nan = np.full(D, np.nan, np.float32).tobytes()
    nan_rec = parse_item_hash(nan, b"1", b"1", dim=D)
    assert nan_rec is not None and nan_rec.emb is None


# --- prepared changes: what the follower thread hands to the scoring thread --------------


def table_state(t: ItemTable) -> dict[str, tuple[list[float], bool, bool]]:
    mat, has = t.lookup(t.ids)
    stock = t.in_stock(t.ids)
    return {
        i: (mat[k].round(6).tolist(), bool(has[k]), bool(stock[k])) for k, i in enumerate(t.ids)
    }


def test_apply_changes_equals_apply_and_moves_the_stream_id() -> None:
    records: dict[str, ItemRecord | None] = {
        "a": ItemRecord(emb=vec(3, 4)),
        "b": ItemRecord(emb=None, in_stock=False),
        "z": ItemRecord(emb=vec()),
        "gone": None,
    }
    direct = ItemTable(dim=D, capacity=1)
    direct.upsert(["gone"], [vec(1)])
    direct.apply(records)
    prepared = ItemChanges.from_records(b"9-1", records, D)
    assert len(prepared) == 4 and prepared.removed == ["gone"]
    np.testing.assert_allclose(prepared.vecs[0], vec(0.6, 0.8), atol=1e-6)
    assert prepared.has_text.tolist() == [True, False, False], "a zero vector has no direction"

    via_changes = ItemTable(dim=D, capacity=1)
    via_changes.upsert(["gone"], [vec(1)])
    assert via_changes.apply_changes(prepared) == 4
    assert table_state(via_changes) == table_state(direct)
    assert via_changes.last_stream_id == b"9-1"
    with pytest.raises(ValueError, match="dim"):
        ItemTable(dim=D + 1).apply_changes(prepared)


def test_coalesce_keeps_the_newest_word_on_each_item() -> None:
    steps: list[dict[str, ItemRecord | None]] = [
        {"a": ItemRecord(vec(1)), "b": ItemRecord(vec(0, 1)), "c": ItemRecord(vec(0, 0, 1))},
        {"a": None, "d": ItemRecord(vec(1, 1))},
        {"a": ItemRecord(vec(0, 0, 0, 1), in_stock=False), "b": None, "e": None},
        {"d": ItemRecord(None)},
    ]
    batches = [ItemChanges.from_records(f"{k}-0".encode(), r, D) for k, r in enumerate(steps)]
    merged = coalesce(batches)
    assert merged.last_stream_id == b"3-0"
    assert sorted(merged.ids) == ["a", "c", "d"] and sorted(merged.removed) == ["b", "e"]

    one_by_one, at_once = ItemTable(dim=D), ItemTable(dim=D)
    for t in (one_by_one, at_once):
        t.upsert(["b", "e", "old"], [vec(1), vec(1), vec(1)])
    for batch in batches:
        one_by_one.apply_changes(batch)
    at_once.apply_changes(merged)
    assert table_state(at_once) == table_state(one_by_one)
    assert sorted(at_once.ids) == ["a", "c", "d", "old"]
    assert coalesce(batches[:1]) is batches[0]
    with pytest.raises(ValueError):
        coalesce([])


def test_retry_delay_doubles_up_to_the_cap() -> None:
    assert [retry_delay(f, 0.5, 5.0) for f in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_follower_does_not_retry_or_hang_when_redis_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Port 1 on loopback refuses at once: a real refusal, not a stand-in."""
    import time

    follower = ItemLogFollower.from_url("redis://127.0.0.1:1/0", interval_s=0.5)
    table = ItemTable(dim=D)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="features.item_table"):
        assert follower.catch_up(table) == 0
        delays = [follower.poll_once() for _ in range(4)]
    assert time.monotonic() - start < 1.0
    assert delays == [1.0, 2.0, 4.0, 5.0], "backs off, capped at max_backoff_s"
    assert not follower.healthy and len(table) == 0
    assert sum("unavailable" in m for m in caplog.messages) == 1, "an outage is logged once"
    assert follower.apply_pending(table) == 0
    assert follower.close() is True
