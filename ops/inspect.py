"""``shoprec inspect user|item``: what shoprec knows of one user or item, in one screen.

Read-only.  A user: the rolling embedding (norm, the catalogue items nearest
to it), counters from the meta hash, recent history with item names, and
the last recommendations found on the output topic with their reasons and
latency.  An item: its catalogue record, whether it has a text or behavioural
embedding, its nearest items, what it is co-visited and bought with, and its weighted
events in the latest popularity buckets.  ``state_prefix`` inspects a
replay's shadow state instead of the live one.  Both show how long each key has left
(``features.keys.SCHEMA`` says why the few without a TTL have none), and a user erased
by ``shoprec forget-user`` shows when.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import orjson
from redis.asyncio import Redis

from features import keys
from features.catalog import item_titles
from features.connection import open_redis
from features.forget import ForgetList
from features.item_index import ItemIndex
from features.user_state import decode_history, normalise, vector_from_bytes
from ops.ranges import read_topic
from ops.tail import format_recommendation
from shoprec.settings import Settings

NEAREST = 5


def iso(ts_ms: int | None) -> str | None:
    if ts_ms is None:
        return None
    return dt.datetime.fromtimestamp(ts_ms / 1000, dt.UTC).isoformat(timespec="seconds")


def _int(raw: bytes | None) -> int | None:
    return None if raw is None else int(float(raw))


async def _nearest(
    redis: Redis, vector: np.ndarray[Any, Any] | None, exclude: str | None = None
) -> list[dict[str, Any]]:
    if vector is None or not np.any(vector):
        return []
    index = ItemIndex(redis)
    await index.refresh()
    found = index.nearest(vector[None, :].astype(np.float32), NEAREST + 1)[0]
    found = [(i, s) for i, s in found if i != exclude][:NEAREST]
    names = await item_titles(redis, [i for i, _ in found])
    return [{"item_id": i, "name": names.get(i, i), "cosine": round(s, 3)} for i, s in found]


async def inspect_user(
    settings: Settings, user_id: str, state_prefix: str, n_recs: int = 3, n_hist: int = 10
) -> dict[str, Any]:
    redis = open_redis(settings.redis_url, cluster=settings.redis_cluster, timeout_s=10.0)
    token = keys.STATE_PREFIX.set(state_prefix)
    try:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.get(keys.user_emb(user_id))
            pipe.hgetall(keys.user_meta(user_id))
            pipe.lrange(keys.user_hist(user_id), 0, -1)
            pipe.zcard(keys.user_events(user_id))
            pipe.exists(keys.user_query(user_id))
            pipe.ttl(keys.user_meta(user_id))
            pipe.get(keys.user_pending(user_id))
            emb, meta_raw, hist_raw, n_ids, has_query, ttl, pending = await pipe.execute()
        key_ttls = await _ttls(redis, keys.user_keys(user_id), keys.USER_KEY_SUFFIXES)
        erased = await ForgetList.from_settings(redis, settings).erased_at([user_id])
        meta = {k.decode(): v for k, v in cast(dict[bytes, bytes], meta_raw).items()}
        raw = vector_from_bytes(emb)
        unit = normalise(raw, keys.EMB_DIM) if raw is not None else None
        history = decode_history(hist_raw)[:n_hist]
        names = await item_titles(redis, sorted({h.item_id for h in history}))
        out: dict[str, Any] = {
            "user_id": user_id,
            "state_prefix": state_prefix,
            "known": bool(meta),
            "counters": {
                "events": _int(meta.get("n")),
                "newest_event": iso(_int(meta.get("ref_ts"))),
                "last_emit": iso(_int(meta.get("last_emit_ts"))),
                "event_ids_in_dedupe_window": n_ids,
                # Set between the state write and the broker's acknowledgement of the
                # recommendation; one left behind means a publish never confirmed.
                "unconfirmed_trigger": pending.decode() if pending else None,
                "ttl_s": ttl,
            },
            # Seconds each key has left: -1 never expires, None the key does not exist.
            "key_ttls_s": key_ttls,
            # Set when forget-user erased the user: their events up to then are skipped.
            "erased_at": iso(erased.get(user_id)),
            "embedding": {
                "present": raw is not None,
                "decayed_norm": None if raw is None else round(float(np.linalg.norm(raw)), 4),
                "has_search_query": bool(has_query),
                "nearest_items": await _nearest(redis, unit),
            },
            "history": [
                {"item_id": h.item_id, "name": names.get(h.item_id, h.item_id), "type": h.type}
                | {"ts": iso(h.ts)}
                for h in history
            ],
        }
    finally:
        keys.STATE_PREFIX.reset(token)
        await redis.aclose()
    if n_recs > 0:
        records = await read_topic(
            settings, settings.topic("recs.out"), keys=frozenset({user_id.encode()})
        )
        # A tombstone (forget-user) ends what may be shown: lists before it are the erased
        # user's, kept by the topic until retention, never shown again.
        last_tombstone = max((i for i, r in enumerate(records) if r.value is None), default=-1)
        shown = [r for r in records[last_tombstone + 1 :] if r.value is not None]
        out["last_recommendations"] = [orjson.loads(r.value) for r in shown[-n_recs:]]
    return out


async def inspect_item(settings: Settings, item_id: str, state_prefix: str) -> dict[str, Any]:
    redis = open_redis(settings.redis_url, cluster=settings.redis_cluster, timeout_s=10.0)
    token = keys.STATE_PREFIX.set(state_prefix)
    try:
        fields = cast(dict[bytes, bytes], await redis.hgetall(keys.item(item_id)))
        record = {
            k.decode(): v.decode(errors="replace")
            for k, v in fields.items()
            if k not in (b"emb", b"bemb")
        }
        covis, bought = [
            cast(
                list[tuple[bytes, float]],
                await redis.zrevrange(key(item_id), 0, 9, withscores=True),
            )
            for key in (keys.item_covis, keys.item_cobought)
        ]
        latest = await _latest_buckets(redis, item_id)
        item_ttls = await _ttls(
            redis,
            [keys.item(item_id), keys.item_covis(item_id), keys.item_cobought(item_id)],
            ("record", "co_visits", "co_purchases"),
        )
        names = await item_titles(redis, sorted({m.decode() for m, _ in [*covis, *bought]}))

        def neighbours(rows: list[tuple[bytes, float]]) -> list[dict[str, Any]]:
            return [
                {"item_id": m.decode(), "name": names.get(m.decode(), m.decode())}
                | {"weight": round(float(s), 4)}
                for m, s in rows
            ]

        text_vec = vector_from_bytes(fields.get(b"emb"))
        behav_vec = vector_from_bytes(fields.get(b"bemb"))
        vec = text_vec if text_vec is not None else behav_vec
        return {
            "item_id": item_id,
            "state_prefix": state_prefix,
            "in_catalogue": bool(fields),
            "record": record,
            "embedding": "text"
            if text_vec is not None
            else "behaviour"
            if vec is not None
            else None,
            "nearest_items": await _nearest(redis, vec, exclude=item_id),
            "co_visited_with": neighbours(covis),
            # What a list after a purchase of this item offers with it (complements).
            "bought_with": neighbours(bought),
            "popularity": latest,
            "key_ttls_s": item_ttls,
        }
    finally:
        keys.STATE_PREFIX.reset(token)
        await redis.aclose()


async def _ttls(redis: Redis, names: Sequence[str], labels: Sequence[str]) -> dict[str, int | None]:
    """Seconds left per key: -1 for a key without TTL, None for a key that does not exist."""
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.ttl(name)
        replies = await pipe.execute()
    return {label: None if t == -2 else int(t) for label, t in zip(labels, replies, strict=True)}


def format_ttls(ttls: dict[str, int | None]) -> str:
    def one(t: int | None) -> str:
        return "absent" if t is None else "no TTL" if t < 0 else f"{t:,} s"

    return ", ".join(f"{label} {one(t)}" for label, t in ttls.items())


async def _latest_buckets(redis: Redis, item_id: str) -> dict[str, Any]:
    """The item's weight in the newest hour and day buckets that exist (event time)."""
    out: dict[str, Any] = {}
    for kind, width_ms in (("hour", 3_600_000), ("day", 86_400_000)):
        probe = keys.popularity_hour(0) if kind == "hour" else keys.popularity_day(0)
        pattern = probe[:-1] + "*"
        start = len(pattern) - 1
        found = [k.decode()[start:] async for k in redis.scan_iter(match=pattern, count=10_000)]
        buckets = sorted(int(b) for b in found if b.isdigit())
        if buckets:
            newest = buckets[-1]
            key = keys.popularity_hour(newest) if kind == "hour" else keys.popularity_day(newest)
            score = await redis.zscore(key, item_id)
            out[kind] = {
                "bucket_start": iso(newest * width_ms),
                "weight": score or 0.0,
                "ttl_s": await redis.ttl(key),
            }
    return out


def format_user(doc: dict[str, Any]) -> str:
    c, e = doc["counters"], doc["embedding"]
    lines = [
        f"user {doc['user_id']}"
        + (f"  (state prefix {doc['state_prefix']!r})" if doc["state_prefix"] else ""),
        f"  events {c['events']}  newest {c['newest_event']}  last emit {c['last_emit']}  "
        f"ttl {c['ttl_s']} s  ids in dedupe window {c['event_ids_in_dedupe_window']}"
        + (f"  unconfirmed trigger {c['unconfirmed_trigger']}" if c["unconfirmed_trigger"] else ""),
        f"  embedding: {'decayed norm ' + str(e['decayed_norm']) if e['present'] else 'none'}"
        + ("  + search query" if e["has_search_query"] else ""),
        f"  keys, time to live: {format_ttls(doc['key_ttls_s'])}",
    ]
    if doc["erased_at"]:
        lines.append(f"  erased at {doc['erased_at']} (forget-user): events up to then are skipped")
    for n in e["nearest_items"]:
        lines.append(f"    near {n['item_id']:<14} {n['cosine']:.3f}  {n['name']}")
    lines.append("  recent history (newest first):")
    for h in doc["history"]:
        lines.append(f"    {h['ts']}  {h['type']:<8} {h['item_id']:<14} {h['name']}")
    if "last_recommendations" in doc:
        lines.append(f"  last {len(doc['last_recommendations'])} recommendations:")
        for rec in doc["last_recommendations"]:
            text = format_recommendation(orjson.dumps(rec))
            lines.extend("    " + line for line in text.splitlines())
    if not doc["known"]:
        lines.append("  (no state: unknown user, expired, or another state prefix)")
    return "\n".join(lines)


def format_item(doc: dict[str, Any]) -> str:
    r = doc["record"]
    lines = [
        f"item {doc['item_id']}" + ("" if doc["in_catalogue"] else "  (not in the catalogue)"),
        f"  {r.get('title') or '(no title)'}  | {r.get('category', '')} | {r.get('brand', '')}",
        f"  price {r.get('price') or '-'}  in stock {r.get('in_stock', '-')}  "
        f"embedding {doc['embedding'] or 'none'}",
    ]
    for n in doc["nearest_items"]:
        lines.append(f"    near {n['item_id']:<14} {n['cosine']:.3f}  {n['name']}")
    for c in doc["co_visited_with"]:
        lines.append(f"    with {c['item_id']:<14} {c['weight']:.3f}  {c['name']}")
    for c in doc["bought_with"]:
        lines.append(f"  bought {c['item_id']:<14} {c['weight']:.3f}  {c['name']}")
    for kind, p in doc["popularity"].items():
        lines.append(
            f"  popularity, {kind} from {p['bucket_start']}: {p['weight']:g}"
            f"  (bucket TTL {p['ttl_s']:,} s)"
        )
    lines.append(f"  keys, time to live: {format_ttls(doc['key_ttls_s'])}")
    return "\n".join(lines)
