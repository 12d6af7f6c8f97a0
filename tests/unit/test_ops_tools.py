"""Operator tools without services: ranges, safety checks, diff maths, the fold, metrics, logs."""

from __future__ import annotations

import logging

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from features.fold import StateFolder
from features.store import UpdatePolicy
from features.user_state import decayed_sum
from ops.dlq import Letter, select, summarise
from ops.ranges import RangeSpec, parse_offsets, parse_time
from ops.replay import ReplayRequest, check_targets
from ops.replay_diff import RecView, diff_recs, overlap_at
from shoprec.dlq import event_id_of
from shoprec.errors import ConfigError, ReplayError
from shoprec.events import EVENT_WEIGHTS, ShopEvent
from shoprec.settings import Settings
from streams.metrics import Histogram, WorkerStats
from streams.observability import JsonFormatter, StatsCollector

NOW = 1_764_080_000_000  # 2025-11-25T14:13:20Z


def settings(**kw: object) -> Settings:
    return Settings(_env_file=None, **kw)  # type: ignore[call-arg, arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("now", NOW),
        ("-2h", NOW - 7_200_000),
        ("now-30m", NOW - 1_800_000),
        ("-1.5d", NOW - 129_600_000),
        ("1764079200000", 1_764_079_200_000),
        ("2025-11-25T14:00", 1_764_079_200_000),
        ("2025-11-25 15:00:00+01:00", 1_764_079_200_000),
    ],
)
def test_parse_time(text: str, expected: int) -> None:
    assert parse_time(text, NOW) == expected


def test_parse_time_rejects_nonsense_with_the_forms_it_takes() -> None:
    with pytest.raises(ConfigError, match="ISO 8601"):
        parse_time("yesterday-ish", NOW)


def test_parse_offsets() -> None:
    assert parse_offsets("0:100, 1:250") == {(None, 0): 100, (None, 1): 250}
    assert parse_offsets("shop.views:2:7") == {("shop.views", 2): 7}
    with pytest.raises(ConfigError, match="PARTITION:OFFSET"):
        parse_offsets("0-100")


def test_range_spec_needs_topics_and_one_kind_of_range() -> None:
    with pytest.raises(ConfigError):
        RangeSpec(())
    with pytest.raises(ConfigError, match="not both"):
        RangeSpec(("t",), from_ms=1, from_offsets={(None, 0): 0})


def request(**kw: object) -> ReplayRequest:
    base: dict[str, object] = {"spec": RangeSpec(("shop.views",), from_ms=1), "into": "recs.replay"}
    return ReplayRequest(**(base | kw))  # type: ignore[arg-type]


def test_replay_refuses_live_targets_unless_asked() -> None:
    s = settings()
    with pytest.raises(ReplayError, match="live output"):
        check_targets(s, request(into="recs.out"))
    with pytest.raises(ReplayError, match="live state"):
        check_targets(s, request(state_prefix=""))
    check_targets(s, request(into="recs.out", state_prefix="", allow_live=True))
    with pytest.raises(ReplayError, match="braces"):
        check_targets(s, request(state_prefix="{x}"))


def test_run_id_names_the_request() -> None:
    assert request().run_id() == request(rate=5.0, limit=3).run_id()  # pacing is not identity
    assert request().run_id() != request(state_prefix="other:").run_id()
    assert request().run_id() != request(users=frozenset({"u1"})).run_id()


def test_overlap_at_k() -> None:
    assert overlap_at(("a", "b", "c"), ("c", "b", "a"), 10) == 1.0
    assert overlap_at(("a", "b"), ("a", "x", "y", "z"), 10) == 0.25
    assert overlap_at((), (), 10) == 1.0
    assert overlap_at(tuple("abcdefghijk"), tuple("abcdefghijz"), 10) == 1.0  # only top 10


def view(trigger: str, items: str, model: str = "fused_ranker@1") -> RecView:
    return RecView("u", trigger, tuple(items), model)


def test_diff_counts_identical_reordered_changed_and_one_sided() -> None:
    base = {"e1": view("e1", "abc"), "e2": view("e2", "abc"), "e3": view("e3", "abc")}
    base["e4"] = view("e4", "abc")
    replayed = {"e1": view("e1", "abc"), "e2": view("e2", "cba"), "e3": view("e3", "abz")}
    replayed["e5"] = view("e5", "abc", "fused_ranker@2")
    d = diff_recs(replayed, base, k=10)
    assert (d.compared, d.identical, d.reordered, d.changed) == (3, 1, 1, 1)
    assert (d.only_in_replay, d.only_in_base, d.differences) == (1, 1, 2)
    assert d.mean_overlap == round((1 + 1 + 2 / 3) / 3, 4)
    assert [e["trigger"] for e in d.examples] == ["e2", "e3"]


def test_diff_of_a_run_with_itself_is_empty() -> None:
    recs = {f"e{i}": view(f"e{i}", "abcdefghij"[i:]) for i in range(5)}
    d = diff_recs(recs, dict(recs))
    assert d.differences == 0 and d.identical == 5 and d.mean_overlap == 1.0


def event(eid: str, ts: int, etype: str = "view", item: str | None = "i1") -> ShopEvent:
    return ShopEvent(eid, etype, "u1", ts, item_id=item)


POLICY = UpdatePolicy(
    half_life_ms=3_600_000.0, history_len=3, ttl_s=60, min_emit_interval_ms=1000, dedupe_window=4
)


def test_fold_matches_the_reference_sum_in_any_order() -> None:
    rng = np.random.default_rng(7)
    vectors = {f"i{k}": rng.normal(size=8).astype(np.float32) for k in range(3)}
    events = [event(f"e{k}", 1_000_000 + 60_000 * k, "cart", f"i{k % 3}") for k in range(4)]
    folder = StateFolder(POLICY, vectors.get, lambda _: None)
    folder.fold(events[2:] + events[:2], {})  # late events arrive after newer ones
    user = folder.out.users["u1"]
    expected, ref = decayed_sum(
        [(e.ts, EVENT_WEIGHTS[e.type], vectors[e.item_id or ""]) for e in events],
        POLICY.half_life_ms,
    )
    assert user.emb is not None and np.allclose(user.emb, expected, rtol=1e-5)
    assert user.ref_ts == ref and user.n == 4


def test_fold_dedupes_caps_history_and_rate_limits_emission() -> None:
    folder = StateFolder(POLICY, lambda _: None, lambda _: "cat")
    folder.fold([event("a", 1000), event("a", 1000), event("b", 1500), event("c", 2600)], {})
    user = folder.out.users["u1"]
    assert folder.out.duplicates == 1 and user.n == 3
    assert user.last_emit_ts == 2600  # 1500 was within the 1000 ms gap after 1000
    folder.fold([event(f"x{k}", 3000 + k) for k in range(5)], {})
    assert len(user.history) == 3 and user.history[0].ts == 3004
    assert len(user.seen) == 4 and "a" not in user.seen  # the dedupe window keeps the newest
    assert user.emb is None  # no item vectors, no embedding
    cv_keys = [k for k in folder.out.counters if k.endswith(":cv")]
    assert cv_keys == []  # one item only: nothing co-visited
    pop = [k for k in folder.out.counters if ":c:cat" in k]
    assert pop, folder.out.counters.keys()


def test_histogram_buckets_are_cumulative_in_the_collector() -> None:
    stats = WorkerStats()
    stats.observe_batch(["t.views", "t.views", "t.carts"], ["not_json"], [3, 40, 40_000], 1)
    stats.record_stages({"ranker": 7.0})
    registry = CollectorRegistry()
    registry.register(StatsCollector(stats))
    text = generate_latest(registry).decode()
    assert 'shoprec_events_total{topic="t.views"} 2.0' in text
    assert 'shoprec_dead_letters_total{reason="not_json"} 1.0' in text
    assert 'shoprec_event_age_ms_bucket{le="50.0"} 2.0' in text
    assert 'shoprec_event_age_ms_bucket{le="+Inf"} 3.0' in text
    assert 'shoprec_stage_ms_count{stage="ranker"} 1.0' in text
    assert "shoprec_triton_errors_total 1.0" in text


def test_histogram_edges() -> None:
    h = Histogram()
    h.observe(5)  # on a bound: counted in that bucket (le)
    h.observe(1e9)
    assert h.counts[0] == 1 and h.counts[-1] == 1 and h.total == 5 + 1e9


def test_json_log_lines_carry_extras() -> None:
    record = logging.makeLogRecord(
        {"name": "shoprec.worker", "levelno": 30, "levelname": "WARNING", "msg": "dead %s"}
    )
    record.args = ("x",)
    record.event_id = "e-17"
    doc = orjson.loads(JsonFormatter().format(record))
    assert doc["msg"] == "dead x" and doc["event_id"] == "e-17" and doc["level"] == "warning"


def letter(ref: int, reason: str, original: bytes | None) -> Letter:
    return Letter(
        0, ref, reason, "", "shop.views", 0, ref, b"k", original, 0, event_id_of(original)
    )


def test_dlq_selection_and_summary() -> None:
    letters = [
        letter(1, "not_json", b"{oops"),
        letter(2, "unknown_type", b'{"event_id": "e2", "type": "like"}'),
        letter(3, "not_json", None),
    ]
    assert [x.event_id for x in letters] == [None, "e2", None]
    assert [x.ref for x in select(letters, reasons=["not_json"])] == ["0:1", "0:3"]
    assert [x.ref for x in select(letters, refs=["0:2"])] == ["0:2"]
    s = summarise(letters, latest=2)
    assert s.total == 3 and s.by_reason == {"not_json": 2, "unknown_type": 1}
    assert [x["dlq"] for x in s.latest] == ["0:2", "0:3"]


def test_covisitation_pairs_recent_distinct_items_within_the_window() -> None:
    # The store and the fold pair events with this one function (features.store).
    from features.store import COVIS_SPAN, COVIS_WINDOW_MS, covisited
    from features.user_state import HistoryEntry

    rng = np.random.default_rng(3)
    for _ in range(500):
        ts = int(rng.integers(0, 10**9))
        recent = [
            HistoryEntry(f"i{rng.integers(0, 8)}", "view", ts - int(rng.integers(-1, 2) * 9e7))
            for _ in range(int(rng.integers(0, 12)))
        ]
        item = f"i{rng.integers(0, 8)}"
        near = [h.item_id for h in recent if abs(ts - h.ts) <= COVIS_WINDOW_MS]
        expected = list(dict.fromkeys(i for i in near if i != item))[:COVIS_SPAN]
        assert covisited(item, ts, recent) == expected


def test_copurchase_pairs_earlier_purchases_within_30_days_and_reads_after_a_purchase() -> None:
    from features.store import (
        COPURCHASE_WINDOW_MS,
        UpdateResult,
        UserUpdate,
        copurchased,
        just_bought,
        signal_bumps,
    )
    from features.user_state import HistoryEntry

    day = 86_400_000
    t = 100 * day
    recent = [  # newest first, as the update script returns them
        HistoryEntry("case", "purchase", t),  # the same basket
        HistoryEntry("phone", "view", t - 1),  # viewed, not bought
        HistoryEntry("charger", "purchase", t - 29 * day),
        HistoryEntry("case", "purchase", t - 29 * day),  # bought twice: paired once
        HistoryEntry("tv", "purchase", t - COPURCHASE_WINDOW_MS - 1),  # too long ago
    ]
    assert copurchased("phone", t, recent) == ["case", "charger"]
    assert copurchased("case", t, recent) == ["charger"]

    def update(item: str, etype: str) -> UserUpdate:
        return UserUpdate(f"e-{item}", "u1", etype, t, item, None, False)

    bumps = signal_bumps(
        [update("phone", "purchase"), update("phone", "view")],
        [UpdateResult(True, True, recent), UpdateResult(True, True, recent)],
        lambda _: None,
    )
    bought = {k.split("}")[0] + "}": b.members for k, b in bumps.items() if k.endswith(":cb")}
    assert {k: set(v) for k, v in bought.items()} == {
        "{i:phone}": {"case", "charger"},
        "{i:case}": {"phone"},
        "{i:charger}": {"phone"},
    }
    # Only a user whose newest event is a purchase has a basket to find complements for.
    assert just_bought(recent) == ["case"]
    assert just_bought([HistoryEntry("x", "purchase", t), *recent]) == ["x", "case"]
    assert just_bought(recent[1:]) == []
