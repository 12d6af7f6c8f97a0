"""Reading an output topic from the command line (`shoprec recs tail`, `shoprec dlq tail`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

import orjson
from aiokafka import AIOKafkaConsumer

from shoprec.settings import Settings
from streams.topics import kafka_options


async def tail_topic(
    settings: Settings,
    topic: str,
    from_beginning: bool = False,
    limit: int | None = None,
    idle_timeout_s: float | None = None,
    key: str | None = None,
) -> AsyncIterator[bytes]:
    """Yield record values of ``topic`` (optionally only those with ``key``)."""
    consumer = AIOKafkaConsumer(
        topic,
        **kafka_options(settings),
        group_id=None,
        auto_offset_reset="earliest" if from_beginning else "latest",
        enable_auto_commit=False,
    )
    await consumer.start()
    wanted = None if key is None else key.encode()
    seen = 0
    try:
        while limit is None or seen < limit:
            batch = await consumer.getmany(timeout_ms=500)
            if not batch:
                if idle_timeout_s is not None:
                    idle_timeout_s -= 0.5
                    if idle_timeout_s <= 0:
                        return
                continue
            for records in batch.values():
                for record in records:
                    if wanted is not None and record.key != wanted:
                        continue
                    if record.value is None:
                        continue
                    seen += 1
                    yield record.value
                    if limit is not None and seen >= limit:
                        return
    finally:
        await asyncio.shield(consumer.stop())


def format_recommendation(value: bytes, names: Mapping[str, str] | None = None) -> str:
    """A one-screen human view of one recs.out record; ``names`` (item id -> a short name)
    are shown beside the ids they name."""
    rec = orjson.loads(value)
    trig = rec["trigger"]
    head = (
        f"user {rec['user_id']}  after {trig['type']} ({trig['event_id']})  "
        f"{rec['latency_ms']} ms  {rec['model']}{'  DEGRADED' if rec['degraded'] else ''}"
    )
    lines = [head]
    shown = {
        item["item_id"]: item["item_id"]
        + (f" [{names[item['item_id']][:40]}]" if names and item["item_id"] in names else "")
        for item in rec["items"]
    }
    width = max([16, *map(len, shown.values())])
    for n, item in enumerate(rec["items"], 1):
        lines.append(
            f"  {n:2d}. {shown[item['item_id']]:<{width}} {item['score']:.3f}  "
            f"{'; '.join(item['reasons'])}"
        )
    return "\n".join(lines)
