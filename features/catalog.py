"""The write path of the item store: catalogue records into Redis.

Each change is also appended to the ``items:log`` stream, which every worker
and the ranker follow to keep their in-memory item tables fresh: with several
workers, each consumes only some catalogue partitions, but all must see every
item.
"""

from __future__ import annotations

from collections.abc import Sequence

from redis.asyncio import Redis

from features import keys
from features.user_state import Vector, vector_to_bytes
from shoprec.events import CatalogItem

# The log only needs to reach every follower once; followers that fall further
# behind than this reload the whole table.
ITEM_LOG_MAXLEN = 1_000_000


def item_fields(item: CatalogItem, embedding: Vector | None) -> dict[str, str | bytes]:
    fields: dict[str, str | bytes] = {
        "title": item.title or "",
        "category": item.category or "",
        "brand": item.brand or "",
        "price": "" if item.price is None else repr(item.price),
        "in_stock": "1" if item.in_stock else "0",
        "ts": str(item.ts),
    }
    if embedding is not None:
        fields["emb"] = vector_to_bytes(embedding)
    return fields


async def upsert_items(
    redis: Redis, items: Sequence[CatalogItem], embeddings: Sequence[Vector | None]
) -> None:
    """Store items (and their text embeddings where they have text), each with its number."""
    new = await _unnumbered(redis, [item.item_id for item in items])
    numbers = await _take_numbers(redis, new)
    async with redis.pipeline(transaction=False) as pipe:
        for item, emb in zip(items, embeddings, strict=True):
            key = keys.item(item.item_id)
            if emb is None:
                # A record without text must not keep a stale embedding from an older one.
                pipe.hdel(key, "emb")
            if item.item_id in numbers:
                # HSETNX: a number, once given, is the item's for life (a concurrent
                # writer's number wins and this one is simply never used).
                pipe.hsetnx(key, "n", numbers[item.item_id])
            pipe.hset(key, mapping=item_fields(item, emb))  # type: ignore[arg-type]
            pipe.xadd(keys.ITEM_LOG, {"id": item.item_id}, maxlen=ITEM_LOG_MAXLEN, approximate=True)
        await pipe.execute()


async def number_items(redis: Redis, item_ids: Sequence[str]) -> int:
    """Give catalogue items stored before items had numbers their number, and log them so
    every item table reads them again; returns how many were numbered."""
    async with redis.pipeline(transaction=False) as pipe:
        for item_id in item_ids:
            pipe.hmget(keys.item(item_id), ["n", "in_stock"])
        replies = await pipe.execute()
    todo = [i for i, (n, stock) in zip(item_ids, replies, strict=True) if n is None and stock]
    numbers = await _take_numbers(redis, todo)
    async with redis.pipeline(transaction=False) as pipe:
        for item_id, num in numbers.items():
            pipe.hsetnx(keys.item(item_id), "n", num)
            pipe.xadd(keys.ITEM_LOG, {"id": item_id}, maxlen=ITEM_LOG_MAXLEN, approximate=True)
        await pipe.execute()
    return len(numbers)


async def _unnumbered(redis: Redis, item_ids: Sequence[str]) -> list[str]:
    async with redis.pipeline(transaction=False) as pipe:
        for item_id in item_ids:
            pipe.hexists(keys.item(item_id), "n")
        found = await pipe.execute()
    return list(dict.fromkeys(i for i, has in zip(item_ids, found, strict=True) if not has))


async def _take_numbers(redis: Redis, item_ids: Sequence[str]) -> dict[str, int]:
    """The next ``len(item_ids)`` item numbers from ``items:seq`` (numbers start at 0)."""
    if not item_ids:
        return {}
    last = int(await redis.incrby(keys.ITEM_SEQ, len(item_ids)))
    first = last - len(item_ids)
    return {item_id: first + k for k, item_id in enumerate(item_ids)}


async def remove_items(redis: Redis, item_ids: Sequence[str]) -> None:
    """Apply tombstones: the item disappears from the store and from every follower's table."""
    async with redis.pipeline(transaction=False) as pipe:
        for item_id in item_ids:
            pipe.delete(keys.item(item_id))
            pipe.xadd(keys.ITEM_LOG, {"id": item_id}, maxlen=ITEM_LOG_MAXLEN, approximate=True)
        await pipe.execute()


async def item_titles(redis: Redis, item_ids: Sequence[str]) -> dict[str, str]:
    """Names for explanations ("similar to <name>"): the title, else brand and category."""
    if not item_ids:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for item_id in item_ids:
            pipe.hmget(keys.item(item_id), ["title", "brand", "category"])
        raw = await pipe.execute()
    return {i: display_name(i, *fields) for i, fields in zip(item_ids, raw, strict=True)}


def display_name(item_id: str, title: bytes | None, brand: bytes | None, cat: bytes | None) -> str:
    if title:
        return title.decode()
    leaf = cat.decode().rsplit(">", 1)[-1].strip() if cat else ""
    name = " ".join(p for p in (brand.decode() if brand else "", leaf) if p)
    return name or item_id
