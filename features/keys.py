"""The Redis key schema: one function per key, so the layout lives in one place.

A user's keys share the hash tag ``{u:<id>}`` so Redis Cluster keeps them in
one slot (the update script touches them together); an item's keys share
``{i:<id>}``.  Global keys (popularity, the item log) are their own slots.

    {u:<user>}:emb     float32 bytes, the decayed sum of event vectors (normalise on read)
    {u:<user>}:meta    hash: ref_ts (ms), n (events), last_emit_ts, last_query_ts
    {u:<user>}:hist    list of "item|type|ts", newest first, capped
    {u:<user>}:ev      sorted set of recent event ids (score ts): the dedupe window
    {u:<user>}:q       float32 bytes, embedding of the last search query
    {i:<item>}         hash: title, category, brand, price, in_stock, ts, emb (float32 bytes)
    {i:<item>}:cv      sorted set: co-visited item -> decayed count
    pop:h:<hour>       sorted set: item -> events in that event-time hour (TTL 2 days)
    items:log          stream of item changes (field "id"): workers and the ranker
                       follow it to keep their in-memory item tables fresh
"""

from __future__ import annotations

ITEM_LOG = "items:log"
EMB_DIM = 384


def user_emb(user: str) -> str:
    return f"{{u:{user}}}:emb"


def user_meta(user: str) -> str:
    return f"{{u:{user}}}:meta"


def user_hist(user: str) -> str:
    return f"{{u:{user}}}:hist"


def user_events(user: str) -> str:
    return f"{{u:{user}}}:ev"


def user_query(user: str) -> str:
    return f"{{u:{user}}}:q"


def item(item_id: str) -> str:
    return f"{{i:{item_id}}}"


def item_covis(item_id: str) -> str:
    return f"{{i:{item_id}}}:cv"


def popularity_hour(hour: int) -> str:
    return f"pop:h:{hour}"
