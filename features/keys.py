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
    {i:<item>}         hash: title, category, brand, price, in_stock, ts, emb (float32 bytes),
                       bemb (behavioural embedding of an item without text)
    {i:<item>}:cv      sorted set: co-visited item -> forward-decayed count (features.decay),
                       the 200 strongest kept
    pop:h:<hour>       sorted set: item -> weighted events in that event-time hour (TTL 2 days)
    pop:d:<day>        the same per event-time day (TTL 3 days)
    pop:h:<hour>:c:<category>, pop:d:<day>:c:<category>   the same within one category
    items:log          stream of item changes (field "id"): workers and the ranker
                       follow it to keep their in-memory item tables fresh
"""

from __future__ import annotations

from contextvars import ContextVar

ITEM_LOG = "items:log"
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


def user_keys(user: str) -> list[str]:
    """Every key of one user, in the order the update script takes them."""
    return [user_emb(user), user_meta(user), user_hist(user), user_events(user), user_query(user)]


def item(item_id: str) -> str:
    return f"{{i:{item_id}}}"


def item_covis(item_id: str) -> str:
    return _state(f"{{i:{item_id}}}:cv")


def popularity_hour(hour: int, category: str | None = None) -> str:
    key = f"pop:h:{hour}" if category is None else f"pop:h:{hour}:c:{category}"
    return _state(key)


def popularity_day(day: int, category: str | None = None) -> str:
    key = f"pop:d:{day}" if category is None else f"pop:d:{day}:c:{category}"
    return _state(key)
