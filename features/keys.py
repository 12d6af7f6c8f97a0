"""The Redis key schema: one function per key, so the layout lives in one place.

A user's keys share the hash tag ``{u:<id>}`` so Redis Cluster keeps them in
one slot (the update script touches them together); an item's keys share
``{i:<id>}``.  Global keys (popularity, the item log) are their own slots.

    {u:<user>}:emb     float32 bytes, the decayed sum of event vectors (normalise on read)
    {u:<user>}:meta    hash: ref_ts (ms), n (events), last_emit_ts, last_query_ts
    {u:<user>}:hist    list of "item|type|ts", newest first, capped
    {u:<user>}:ev      sorted set of recent event ids (score ts): the dedupe window
    {u:<user>}:q       float32 bytes, embedding of the last search query
    {u:<user>}:pend    id of the user's latest trigger whose recommendation is not yet
                       confirmed published (a redelivery of that event re-triggers it)
    {u:<user>}:mem     sorted set: item -> forward-decayed count of the user's events on it
                       (features.decay, half-life 180 days), the strongest
                       SHOPREC_MEMORY_LEN kept: the items of their whole past
    {u:<user>}:xp      hash: the user's experiment and arm, and what was credited to each
                       arm's lists (features.attribution)
    {u:<user>}:xl      list of the lists shown to the user (JSON, newest first)
    {u:<user>}:xe      sorted set of the event ids already attributed (score ts)
    {u:<user>}:xr      list of the user's latest attributions (JSON, newest first)
    {i:<item>}         hash: n (the item's number: requests to the ranker name items by it),
                       title, category, brand, price, in_stock, ts, emb (float32 bytes),
                       bemb (behavioural embedding of an item without text)
    {i:<item>}:cv      sorted set: co-visited item -> forward-decayed count (features.decay),
                       the 200 strongest kept
    {i:<item>}:cb      sorted set: item bought by the same user within 30 days -> forward-
                       decayed count (co-purchase: complements shown after a purchase)
    pop:h:<hour>       sorted set: item -> weighted events in that event-time hour (TTL 2 days)
    pop:d:<day>        the same per event-time day (TTL 3 days)
    pop:h:<hour>:c:<category>, pop:d:<day>:c:<category>   the same within one category
    items:seq          counter: the last item number handed out (never expires: a number
                       is never reused, or a stale request could name the wrong item)
    items:log          stream of item changes (field "id"): workers and the ranker
                       follow it to keep their in-memory item tables fresh
    exp:<name>:totals  hash: an experiment's counters per arm (no user ids), for the bandit
    exp:<name>:alloc   sorted set: the bandit's allocations over time (score = period)
    <prefix>ckpt:replay:<run>   hash: a replay's next offsets per partition (ops.replay)
    dlq:reinjected     set of dead letters already re-injected (ops.dlq)
    <topics>forget:users   sorted set: keyed hash of an erased user id -> erase time (ms);
                       the suppression list replay, rebuild and the worker consult

Anything stored about one user goes under their hash tag ``{u:<id>}`` (any prefix, any
suffix without braces): ``shoprec forget-user`` erases every such key, so a new per-user
key (attribution records, cached lists) is erased without touching the eraser.  Add its
suffix to :data:`USER_KEY_SUFFIXES` and its :class:`KeySpec` to :data:`SCHEMA` (how long
it lives, or why it never expires): inspect shows it, and the retention test fails on a
key that matches no spec or lacks the TTL its spec promises.  A key that holds one user's
data without their hash tag would survive an erase: don't.
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from dataclasses import dataclass, field

ITEM_LOG = "items:log"
ITEM_SEQ = "items:seq"
EMB_DIM = 384

# Event-derived keys (users, co-visitation, popularity) start with this prefix, so a replay
# can fold history into shadow state beside the live one; "" is the live state.  A context
# variable, so it holds per asyncio task without threading a parameter through every layer
# (streams.runtime.Runtime sets it from SHOPREC_STATE_PREFIX).  The prefix comes before the hash
# tag, so a user's keys still share one Cluster slot.  Item hashes and items:log are the
# catalogue, shared by live and shadow state, and never prefixed.
STATE_PREFIX: ContextVar[str] = ContextVar("shoprec_state_prefix", default="")


def _state(key: str) -> str:
    return STATE_PREFIX.get() + key


def user_emb(user: str) -> str:
    return _state(f"{{u:{user}}}:emb")


def user_meta(user: str) -> str:
    return _state(f"{{u:{user}}}:meta")


def user_hist(user: str) -> str:
    return _state(f"{{u:{user}}}:hist")


def user_events(user: str) -> str:
    return _state(f"{{u:{user}}}:ev")


def user_query(user: str) -> str:
    return _state(f"{{u:{user}}}:q")


def user_pending(user: str) -> str:
    return _state(f"{{u:{user}}}:pend")


def user_memory(user: str) -> str:
    return _state(f"{{u:{user}}}:mem")


def user_experiment(user: str) -> str:
    return _state(f"{{u:{user}}}:xp")


def user_lists(user: str) -> str:
    return _state(f"{{u:{user}}}:xl")


def user_attributed(user: str) -> str:
    return _state(f"{{u:{user}}}:xe")


def user_attributions(user: str) -> str:
    return _state(f"{{u:{user}}}:xr")


# Every per-user key's suffix; the first seven in the order the update script takes them,
# then attribution's four in the order its script takes them (features/attribute.lua).
USER_KEY_SUFFIXES: tuple[str, ...] = (
    "emb", "meta", "hist", "ev", "q", "pend", "mem", "xp", "xl", "xe", "xr",
)  # fmt: skip


def user_tag(user: str) -> str:
    """The hash tag every key of ``user`` carries, under any prefix."""
    return f"{{u:{user}}}"


def user_keys(user: str) -> list[str]:
    """Every key of one user under the current prefix (see :data:`USER_KEY_SUFFIXES`)."""
    return [_state(f"{user_tag(user)}:{suffix}") for suffix in USER_KEY_SUFFIXES]


def item(item_id: str) -> str:
    return f"{{i:{item_id}}}"


def item_covis(item_id: str) -> str:
    return _state(f"{{i:{item_id}}}:cv")


def item_cobought(item_id: str) -> str:
    return _state(f"{{i:{item_id}}}:cb")


def popularity_hour(hour: int, category: str | None = None) -> str:
    key = f"pop:h:{hour}" if category is None else f"pop:h:{hour}:c:{category}"
    return _state(key)


def popularity_day(day: int, category: str | None = None) -> str:
    key = f"pop:d:{day}" if category is None else f"pop:d:{day}:c:{category}"
    return _state(key)


def experiment_totals(name: str) -> str:
    """An experiment's counters per arm: one key, so every write is a single-key command."""
    return _state(f"exp:{name}:totals")


def experiment_allocations(name: str) -> str:
    """The bandit's allocation per period: one key, written first-come by any worker."""
    return _state(f"exp:{name}:alloc")


# --- operations and privacy keys ------------------------------------------------------------

DLQ_REINJECTED = "dlq:reinjected"


def replay_checkpoint(state_prefix: str, run_id: str) -> str:
    """A replay's checkpoint, under the replay's own state prefix."""
    return f"{state_prefix}ckpt:replay:{run_id}"


def forgotten_users(topic_prefix: str) -> str:
    """The suppression list of erased users: one per topic namespace, since what it
    suppresses are the events still retained in those topics (never state-prefixed: a
    replay's shadow state must skip the same users as the live one)."""
    return f"{topic_prefix}forget:users"


def glob_escape(text: str) -> str:
    """``text`` as a literal inside a Redis SCAN/KEYS glob pattern."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


# --- what each key holds and how long it lives ----------------------------------------------

_PLACEHOLDER = re.compile(r"<(\w+)>")
_STATE_PREFIX_RE = r"(?P<prefix>[^{}\s]*?)"  # SHOPREC_STATE_PREFIX or a replay's shadow


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One kind of key: what it holds and how long it lives.

    ``ttl`` says how long, and who sets it; a key that never expires (``expires`` False)
    says why instead.  ``personal``: it holds data about one user, under their hash tag,
    and ``shoprec forget-user`` erases it.
    """

    pattern: str  # as in the docs; <placeholders> stand for ids
    holds: str
    ttl: str
    expires: bool = True
    personal: bool = False
    prefixed: str = "state"  # "state": under a state prefix; "topics": the topic prefix; ""
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        body = "".join(
            (r"\d+" if part in ("hour", "day") else "(?:.+)") if i % 2 else re.escape(part)
            for i, part in enumerate(_PLACEHOLDER.split(self.pattern))
        )
        head = {"state": _STATE_PREFIX_RE, "topics": r"(?P<prefix>\S*?)", "": "(?P<prefix>)"}
        object.__setattr__(self, "regex", re.compile(f"^{head[self.prefixed]}{body}$", re.S))


_USER_TTL = "SHOPREC_USER_TTL_S (30 days) after the user's latest event"

# Every key shoprec writes.  The integration test of forget-user scans the whole Redis of a
# live run (worker, replay, rebuild, inspect, dlq replay, forget) and checks each key here.
SCHEMA: tuple[KeySpec, ...] = (
    KeySpec("{u:<user>}:emb", "rolling embedding of the user's events", _USER_TTL, personal=True),
    KeySpec(
        "{u:<user>}:meta",
        "newest event time, event count, last emission time",
        _USER_TTL,
        personal=True,
    ),
    KeySpec(
        "{u:<user>}:hist",
        "the latest SHOPREC_HISTORY_LEN (item, type, time) of the user",
        _USER_TTL,
        personal=True,
    ),
    KeySpec(
        "{u:<user>}:ev",
        "the ids and times of the user's latest 128 events",
        _USER_TTL,
        personal=True,
    ),
    KeySpec(
        "{u:<user>}:q",
        "embedding of the user's last search query (not the text)",
        "SHOPREC_USER_TTL_S after the user's last search",
        personal=True,
    ),
    KeySpec(
        "{u:<user>}:pend",
        "id of the user's latest trigger event not yet confirmed published",
        "SHOPREC_USER_TTL_S; deleted once the broker acknowledges the recommendation",
        personal=True,
    ),
    KeySpec(
        "{u:<user>}:mem",
        "the items of the user's whole past (the SHOPREC_MEMORY_LEN strongest), each with "
        "a count of their events on it decayed with a 180-day half-life",
        _USER_TTL,
        personal=True,
    ),
    KeySpec(
        "{u:<user>}:xp",
        "the user's experiment and arm; lists, clicks, carts, purchases and revenue credited "
        "to each arm; all their purchases and spend",
        _USER_TTL,
        personal=True,
    ),
    KeySpec(
        "{u:<user>}:xl",
        "the lists shown to the user (id, arm, trigger time, items) within the attribution "
        "window, at most 100",
        _USER_TTL,
        personal=True,
    ),
    KeySpec(
        "{u:<user>}:xe",
        "the ids and times of the user's latest 128 attributed events (exactly once)",
        _USER_TTL,
        personal=True,
    ),
    KeySpec(
        "{u:<user>}:xr",
        "the user's latest 100 attributions: event, list, position, arm, revenue",
        _USER_TTL,
        personal=True,
    ),
    KeySpec(
        "exp:<name>:totals",
        "an experiment's counters per arm (users, lists, credited events, revenue), no ids",
        "90 days after the experiment's last update (features.attribution.EXPERIMENT_TTL_S)",
    ),
    KeySpec(
        "exp:<name>:alloc",
        "the bandit's allocation of new users to arms, per period, with the counts it used",
        "90 days after the last allocation; the latest 10,000 periods kept",
    ),
    KeySpec(
        "{i:<item>}",
        "the catalogue record, its number, text and behavioural embeddings",
        "none: the catalogue; lives while catalog.items (compacted) holds the item, whose "
        "tombstone deletes it",
        expires=False,
        prefixed="",
    ),
    KeySpec(
        "{i:<item>}:cv",
        "items co-visited with this one, summed over all users (no user id)",
        "30 days after the last co-visit (features.store.COVIS_TTL_S)",
    ),
    KeySpec(
        "{i:<item>}:cb",
        "items bought by the same customer within 30 days of this one, summed over all "
        "customers (no user id)",
        "30 days after the last co-purchase (features.store.COVIS_TTL_S)",
    ),
    KeySpec("pop:h:<hour>", "weighted events per item in one event-time hour", "2 days"),
    KeySpec("pop:h:<hour>:c:<category>", "the same within one category", "2 days"),
    KeySpec("pop:d:<day>", "weighted events per item in one event-time day", "3 days"),
    KeySpec("pop:d:<day>:c:<category>", "the same within one category", "3 days"),
    KeySpec(
        ITEM_LOG,
        "item ids changed in the catalogue, in order",
        "none: capped at about 1,000,000 entries; every worker and Triton follow it from "
        "their last position, and an expired log would make each reload the whole table",
        expires=False,
        prefixed="",
    ),
    KeySpec(
        ITEM_SEQ,
        "the last item number handed out",
        "none: a number is never reused, or a stale request could name the wrong item",
        expires=False,
        prefixed="",
    ),
    KeySpec(
        "ckpt:replay:<run>",
        "a replay's next offset per partition",
        "7 days after the replay's last batch (ops.replay.CHECKPOINT_TTL_S)",
    ),
    KeySpec(
        DLQ_REINJECTED,
        "which dead letters (topic:partition:offset) were re-injected",
        "SHOPREC_TOPIC_RETENTION_S after the last re-injection: the dead letters themselves "
        "are gone from the topic by then",
        prefixed="",
    ),
    KeySpec(
        "forget:users",
        "keyed hash (BLAKE2b, never the id) of each erased user -> erase time",
        "SHOPREC_TOPIC_RETENTION_S after the latest erase; older entries are dropped at each "
        "erase: the erased user's events are gone from the topics by then",
        prefixed="topics",
    ),
)


def spec_of(key: str) -> KeySpec | None:
    """The kind of ``key`` (as stored, with any prefix), or None for a key not shoprec's."""
    for spec in SCHEMA:
        if spec.regex.match(key):
            return spec
    return None
