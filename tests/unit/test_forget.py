"""The pure parts of forgetting a user: which keys are theirs, the suppression rule and
its hash, erase requests on the control topic, the report, and the key schema's TTLs."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Sequence
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from features import keys
from features.forget import HASH_HEX_CHARS, ForgetList, by_prefix, parse_user_key, suppressed
from features.store import UpdateResult, UserUpdate
from ops.forget import format_report
from shoprec.errors import InvalidEvent
from shoprec.events import Limits, parse_control
from shoprec.settings import Settings
from streams.control import ForgetReport
from streams.ingest import Ingestor, RawRecord
from tests.unit.test_ingest_books import NoEncoder, NoVectors

DOCS = Path(__file__).resolve().parents[2] / "docs"
T0 = 1_764_000_000_000

# What a state prefix may be (Settings.state_prefix: no braces, no whitespace).
prefixes = st.text(
    st.characters(codec="utf-8", blacklist_characters="{} \t\n\r\x0b\x0c"),
    max_size=12,
)
user_ids = st.text(
    st.characters(codec="utf-8", blacklist_characters="\x00"),
    min_size=1,
    max_size=40,
)
suffixes = st.text(
    st.characters(codec="utf-8", blacklist_characters="{}\x00"),
    min_size=1,
    max_size=12,
)


@given(prefixes, user_ids, suffixes)
def test_a_user_key_splits_into_prefix_user_and_suffix(prefix: str, user: str, suffix: str) -> None:
    parsed = parse_user_key(f"{prefix}{{u:{user}}}:{suffix}")
    assert parsed is not None
    assert (parsed.prefix, parsed.user, parsed.suffix) == (prefix, user, suffix)


@given(user_ids, user_ids, suffixes)
def test_one_users_key_is_never_another_users(a: str, b: str, suffix: str) -> None:
    parsed = parse_user_key(f"{{u:{a}}}:{suffix}")
    assert parsed is not None and (parsed.user == b) == (a == b)


def test_ids_with_braces_and_the_schemas_own_keys() -> None:
    # An id may hold "}:" (only NUL is refused): the suffix has no brace, so the last "}"
    # ends the id and user "a" does not own user "a}:x"'s keys.
    parsed = parse_user_key("replay:{u:a}:x}:emb")
    assert parsed is not None and (parsed.prefix, parsed.user, parsed.suffix) == (
        "replay:",
        "a}:x",
        "emb",
    )
    token = keys.STATE_PREFIX.set("rebuild:")
    try:
        for key in keys.user_keys("541312140"):
            found = parse_user_key(key)
            assert found is not None and found.user == "541312140" and found.prefix == "rebuild:"
        not_users = [
            keys.item("541312140"),
            keys.item_covis("{u:541312140}"),  # an item id that looks like a tag
            keys.popularity_hour(5, "{u:x}"),
            keys.ITEM_LOG,
            keys.forgotten_users("t1."),
        ]
    finally:
        keys.STATE_PREFIX.reset(token)
    assert [parse_user_key(k) for k in not_users] == [None] * len(not_users)
    assert parse_user_key("a}b{u:x}:emb") is None  # a prefix never holds a brace
    assert parse_user_key("{u:x}:em{b") is None
    assert parse_user_key("{u:x}") is None and parse_user_key("{u:x}:") is None


def test_by_prefix_reports_suffixes_without_ids() -> None:
    found = [parse_user_key(k) for k in ("{u:7}:emb", "{u:7}:meta", "replay:{u:7}:emb")]
    assert by_prefix(k for k in found if k is not None) == {
        "": ["emb", "meta"],
        "replay:": ["emb"],
    }


def test_the_rule_events_up_to_the_erase_are_skipped_later_ones_are_not() -> None:
    assert suppressed(T0, T0 - 1) and suppressed(T0, T0)
    assert not suppressed(T0, T0 + 1)
    assert not suppressed(None, T0)


def test_the_list_names_users_by_a_keyed_hash_only() -> None:
    keyed = ForgetList(None, "forget:users", b"s3cret", 3600)  # type: ignore[arg-type]
    plain = ForgetList(None, "forget:users", b"", 3600)  # type: ignore[arg-type]
    h = keyed.hash("541312140")
    want = hashlib.blake2b(b"541312140", key=b"s3cret", digest_size=16).hexdigest()
    assert h == want and keyed.hash("541312140") == h  # stable across calls
    assert len(h) == HASH_HEX_CHARS and "541312140" not in h
    assert plain.hash("541312140") != h and keyed.keyed and not plain.keyed
    assert keyed.hash("541312141") != h
    long_key = ForgetList(None, "forget:users", b"k" * 100, 3600)  # type: ignore[arg-type]
    assert len(long_key.hash("541312140")) == HASH_HEX_CHARS  # a key over 64 bytes works


# --- erase requests on shop.control ----------------------------------------------------------


def test_control_records_parse_or_say_why_not() -> None:
    limits = Limits()
    req = parse_control(
        b"u1",
        orjson.dumps({"type": "forget_user", "user_id": "u1", "ts": T0}),
        now_ms=T0 + 5,
        limits=limits,
    )
    assert (req.user_id, req.ts) == ("u1", T0)
    no_ts = parse_control(None, b'{"type":"forget_user","user_id":"u1"}', now_ms=T0, limits=limits)
    assert no_ts.ts == T0  # the handler's clock
    bad = {
        b'{"type":"forget","user_id":"u1"}': "unknown_type",
        b'{"type":"forget_user"}': "missing_field",
        b'{"type":"forget_user","user_id":"u2"}': "key_mismatch",
        b'{"type":"forget_user","user_id":"u1","ts":99999999999999}': "ts_in_future",
        b"not json": "not_json",
    }
    for raw, reason in bad.items():
        with pytest.raises(InvalidEvent) as caught:
            parse_control(b"u1", raw, now_ms=T0, limits=limits)
        assert caught.value.reason == reason, raw


# --- the worker's books with erased users ----------------------------------------------------


class AppliedStore:
    def __init__(self) -> None:
        self.applied: list[str] = []

    async def apply_events(self, updates: Sequence[UserUpdate]) -> list[UpdateResult]:
        self.applied += [u.event_id for u in updates]
        return [UpdateResult(True, True, []) for _ in updates]


class ErasedAt(ForgetList):
    """The suppression list with its one Redis read replaced by a fixed answer."""

    def __init__(self, erased: dict[str, int]) -> None:
        super().__init__(None, "forget:users", b"k", 3600)  # type: ignore[arg-type]
        self._erased = erased

    async def erased_at(self, user_ids: Collection[str]) -> dict[str, int]:
        return {u: t for u, t in self._erased.items() if u in user_ids}


async def test_erased_users_events_before_the_erase_are_counted_suppressed_never_applied() -> None:
    script = [  # (event id, user, type, ts)
        ("a1", "gone", "view", T0 - 10),
        ("a2", "gone", "search", T0),  # at the erase time: still the old relationship
        ("a3", "gone", "view", T0 + 1),  # after it: a new relationship, applied
        ("b1", "kept", "view", T0 - 10),
    ]
    records = [
        RawRecord(
            "shop.views",
            0,
            n,
            user.encode(),
            orjson.dumps(
                {"event_id": eid, "type": kind, "user_id": user, "ts": ts}
                | ({"query": "red shoes"} if kind == "search" else {"item_id": "i"})
            ),
        )
        for n, (eid, user, kind, ts) in enumerate(script)
    ]
    store = AppliedStore()
    ingestor = Ingestor(
        store,  # type: ignore[arg-type]
        NoVectors(),
        NoEncoder(),  # type: ignore[arg-type]  # raises: an erased user's search never reaches BERT
        Limits(),
        lambda: T0 + 1000,
        forgotten=ErasedAt({"gone": T0}),
    )
    out = await ingestor.ingest(records)
    assert store.applied == ["a3", "b1"]
    assert out.suppressed == 2 and out.applied == 2
    assert sorted(e.event_id for e in out.triggers) == ["a3", "b1"]


# --- the report ------------------------------------------------------------------------------


def test_the_report_names_the_user_only_by_reference() -> None:
    report = ForgetReport(
        user="u#0123456789ab",
        erase_ts=T0,
        suppression_key="forget:users",
        suppression_member="f" * 32,
        suppression_kept_s=14 * 86_400,
        removed={"": ["emb", "meta"], "replay:": ["emb"]},
        removed_late={"": ["pend"]},
        tombstone={"topic": "recs.out", "partition": 1, "offset": 42},
    )
    doc = report.to_dict()
    assert doc["keys_removed"] == 4 and doc["erase_time"].startswith("2025-11-24T")
    text = format_report(report)
    assert "removed 3 keys" in text and "prefix 'replay:': emb" in text
    assert "second sweep: 1 keys" in text and "offset 42" in text and "14 days" in text
    dry = format_report(ForgetReport("u#x", T0, "forget:users", "f" * 32, 60, dry_run=True))
    assert "would remove 0 keys (no state in Redis)" in dry and "not written: dry run" in dry


# --- every key has a TTL or a documented reason not to ---------------------------------------


def test_every_key_function_has_a_spec_and_user_specs_are_the_user_keys() -> None:
    made = {
        "{u:<user>}:" + s: k
        for s, k in zip(keys.USER_KEY_SUFFIXES, keys.user_keys("541312140"), strict=True)
    }
    made |= {
        "{i:<item>}": keys.item("1004856"),
        "{i:<item>}:cv": keys.item_covis("1004856"),
        "{i:<item>}:cb": keys.item_cobought("1004856"),
        "pop:h:<hour>": keys.popularity_hour(487_000),
        "pop:h:<hour>:c:<category>": keys.popularity_hour(487_000, "electronics > phone"),
        "pop:d:<day>": keys.popularity_day(20_300),
        "pop:d:<day>:c:<category>": keys.popularity_day(20_300, "x"),
        keys.ITEM_LOG: keys.ITEM_LOG,
        "items:seq": "items:seq",
        "ckpt:replay:<run>": keys.replay_checkpoint("replay:", "abc123"),
        keys.DLQ_REINJECTED: keys.DLQ_REINJECTED,
        "forget:users": keys.forgotten_users("t1."),
        "exp:<name>:totals": keys.experiment_totals("ranker-vs-covis"),
        "exp:<name>:alloc": keys.experiment_allocations("ranker-vs-covis"),
    }
    assert set(made) == {s.pattern for s in keys.SCHEMA}
    for pattern, key in made.items():
        spec = keys.spec_of(key)
        assert spec is not None and spec.pattern == pattern, key
        shadow = keys.spec_of("rebuild:" + key)
        # Under another prefix: still the same kind, unless the kind is never prefixed.
        assert (shadow is not None and shadow.pattern == pattern) == (spec.prefixed != "")
    personal = {s.pattern for s in keys.SCHEMA if s.personal}
    assert personal == {"{u:<user>}:" + s for s in keys.USER_KEY_SUFFIXES}
    assert keys.spec_of("{u:1}:attribution") is None  # a new user key needs its spec


def test_keys_without_ttl_say_why_and_the_privacy_page_lists_every_key() -> None:
    for spec in keys.SCHEMA:
        assert spec.ttl.startswith("none:") == (not spec.expires), spec.pattern
        assert not (spec.personal and not spec.expires), "personal data must expire"
    page = (DOCS / "privacy.md").read_text()
    missing = [s.pattern for s in keys.SCHEMA if f"`{s.pattern}`" not in page]
    assert missing == []
    # Settings the page relies on exist under those names.
    for name in re.findall(r"SHOPREC_[A-Z_]+", page):
        assert name.removeprefix("SHOPREC_").lower() in Settings.model_fields, name
