"""After a purchase, the list offers what other customers bought with it: real Kafka,
Faust, Redis, Triton, BERT, real amazon purchases.

The amazon-gift-cards shop's most co-purchased pair of items (X, Y: bought by the same
customer within 30 days) is streamed as it happened, customer by customer; then one more
real buyer of X buys it.  The worker must have counted the pair in ``{i:<item>}:cb`` and
the list after that purchase must hold Y second, explained by X, after the ranker's best
(complements and the ranker's picks take turns).  In an experiment arm that takes no
complements (``"complements": 0``, the setting left at 10) the same purchase gets the
ranker's list alone: the worker sends Triton the arm's own number.
"""

from __future__ import annotations

import gzip
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from features import keys
from features.store import COPURCHASE_WINDOW_MS
from infra.stack import Endpoints
from shoprec.experiments import Experiment
from streams.topics import TopicNames, ensure_topics, kafka_options
from tests.integration.helpers import isolated_settings
from tests.integration.ops_setup import json_out, load_catalogue, shoprec
from tests.integration.test_end_to_end import consume_all
from tests.worker import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PAIR_BUYERS = 8  # customers whose purchases of X and Y are streamed first


def _read(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rb") as fh:
        return [orjson.loads(line) for line in fh]


def top_pair(events: list[dict[str, Any]]) -> tuple[str, str, dict[str, list[dict[str, Any]]]]:
    """The pair bought together by the most customers, and each customer's purchases."""
    by_user: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in sorted(events, key=lambda e: (e["ts"], e["event_id"])):
        by_user[e["user_id"]].append(e)
    pairs: Counter[tuple[str, str]] = Counter()
    for bought in by_user.values():
        together = {
            tuple(sorted((a["item_id"], b["item_id"])))
            for i, a in enumerate(bought)
            for b in bought[:i]
            if a["item_id"] != b["item_id"] and a["ts"] - b["ts"] <= COPURCHASE_WINDOW_MS
        }
        pairs.update(together)
    (x, y), _ = pairs.most_common(1)[0]
    return x, y, by_user


@pytest.mark.parametrize("complements", [10, 0])
async def test_the_list_after_a_purchase_offers_what_is_bought_with_it(
    stack: Endpoints, data_dir: Path, tmp_path: Path, complements: int
) -> None:
    """``complements``: what the (only) arm takes; 10 is the setting's default, 0 the arm's
    own ``complements`` field."""
    folder = data_dir / "amazon-gift-cards-2018"
    x, y, by_user = top_pair(_read(folder / "events.jsonl.gz"))
    pair_users = [u for u, bought in by_user.items() if {x, y} <= {e["item_id"] for e in bought}]
    streamed = [e for u in pair_users[:PAIR_BUYERS] for e in by_user[u] if e["item_id"] in (x, y)]
    # One more real buyer of X who is not among those streamed.
    last = next(
        e
        for u, bought in by_user.items()
        if u not in pair_users[:PAIR_BUYERS]
        for e in bought
        if e["item_id"] == x
    )
    items = _read(folder / "items.jsonl.gz")
    catalogue = [it for it in items if it["item_id"] in {x, y}] + items[:40]
    title_of_x = next(it["title"] for it in items if it["item_id"] == x)

    arm: dict[str, Any] = {"name": f"c{complements}", "share": 1.0}
    if complements != 10:
        arm["complements"] = complements
    s = isolated_settings(
        stack,
        min_emit_interval_ms=0,
        topic_partitions=1,
        complements_after_purchase=10,
        experiment=Experiment.model_validate({"name": "complements", "arms": [arm]}),
    )
    await ensure_topics(s)
    names = TopicNames.from_settings(s)
    redis = Redis.from_url(s.redis_url.get_secret_value())
    worker = WorkerProcess(s, tmp_path / "worker.log")
    producer = AIOKafkaProducer(**kafka_options(s), acks="all")
    await producer.start()
    try:
        await load_catalogue(s, redis, worker, catalogue, timeout_s=240)
        # Each customer's purchases a millisecond apart, in their real order.
        start = int(time.time() * 1000) - len(streamed) - 1
        for n, e in enumerate([*streamed, last]):
            e = e | {"ts": start + n}
            await producer.send(
                names.event_topic("purchase"), orjson.dumps(e), key=e["user_id"].encode()
            )
        await producer.flush()
        recs = await consume_all(
            s,
            names.recs_out,
            lambda rs: any(
                orjson.loads(r.value)["trigger"]["event_id"] == last["event_id"] for r in rs
            ),
            timeout_s=120,
        )
        bought_with_x = await redis.zrevrange(s.state_prefix + keys.item_cobought(x), 0, -1)
    finally:
        await producer.stop()
        worker.stop()
        worker.close()
        await redis.aclose()

    assert y.encode() in bought_with_x, bought_with_x
    # What an operator sees: `shoprec inspect item X` lists Y as bought with it.
    shown = json_out(shoprec(s, "inspect", "item", x, "--json"))
    assert y in [c["item_id"] for c in shown["bought_with"]], shown["bought_with"]
    after = next(
        orjson.loads(r.value)
        for r in recs
        if orjson.loads(r.value)["trigger"]["event_id"] == last["event_id"]
    )
    assert after["degraded"] is False and after["arm"] == f"c{complements}"
    first, second = after["items"][:2]
    if complements:
        assert not first["reasons"][0].startswith("often bought together"), after
        assert second["item_id"] == y, after
        assert second["reasons"][0] == f"often bought together with {title_of_x}", after
    else:
        assert not any(
            r.startswith("often bought together") for i in after["items"] for r in i["reasons"]
        ), after
    assert x not in [i["item_id"] for i in after["items"]]
