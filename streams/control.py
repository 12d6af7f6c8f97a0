"""Erase requests: forget a user everywhere shoprec keeps something about them.

:meth:`Forgetter.forget` is what ``shoprec forget-user`` (``ops/forget.py``) and the
worker's control agent (topic ``shop.control``, :class:`ControlHandler`) both run:

1. record the erase in the suppression list first (:class:`features.forget.ForgetList`),
   so from here on no worker, replay or rebuild applies an event of the user from before
   the request (later events are a new relationship, and are processed);
2. sweep: delete every key under the user's hash tag, under every key prefix;
3. wait ``settle_s`` and sweep again: a batch that read the suppression list just before
   step 1 may still write the user's state and publish a recommendation for them; what it
   wrote is removed now, and reported as ``removed_late``;
4. publish a tombstone (key = user id, null value) on ``recs.out`` after whatever such a
   batch published, so consumers that keep the latest record per key drop the user.

Plain Python, no Faust: the agent in ``streams/app.py`` only hands it records.  Every
step is idempotent, so a request redelivered after a crash is simply done again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import chain
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from features.forget import ForgetList, by_prefix, delete_keys, find_user_keys
from shoprec import redact
from shoprec.dlq import DeadLetter
from shoprec.errors import InvalidEvent
from shoprec.events import ForgetRequest, Limits, parse_control
from shoprec.retry import retry
from shoprec.settings import Settings
from streams.ingest import RawRecord
from streams.topics import RECS_OUT, kafka_options

log = logging.getLogger("shoprec.forget")

# Long enough for a micro-batch that read the suppression list just before the erase to
# finish: its state write comes within milliseconds, its publish after one ranker call
# (SHOPREC_TRITON_TIMEOUT_S, 2 s by default).
SETTLE_S = 5.0


def now_ms() -> int:
    return int(time.time() * 1000)


class Tombstones(Protocol):
    """Publishes a tombstone per user on ``recs.out``; returns where each landed."""

    async def __call__(self, user_ids: Sequence[str]) -> dict[str, dict[str, Any]]: ...


@dataclass(slots=True)
class ForgetReport:
    """What one erase did (or, dry, would do).  Never the raw user id: key names are given
    as suffixes per prefix, and the user as the logs' ``u#<sha256 prefix>``."""

    user: str
    erase_ts: int
    suppression_key: str
    suppression_member: str  # the user's keyed hash in the list
    suppression_kept_s: int
    removed: dict[str, list[str]] = field(default_factory=dict)  # prefix -> key suffixes
    removed_late: dict[str, list[str]] = field(default_factory=dict)  # by the second sweep
    tombstone: dict[str, Any] | None = None  # topic, partition, offset on recs.out
    dry_run: bool = False
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def keys_removed(self) -> int:
        return sum(len(v) for v in chain(self.removed.values(), self.removed_late.values()))

    def to_dict(self) -> dict[str, Any]:
        erased = dt.datetime.fromtimestamp(self.erase_ts / 1000, dt.UTC)
        return asdict(self) | {
            "keys_removed": self.keys_removed,
            "erase_time": erased.isoformat(timespec="milliseconds"),
        }


class Forgetter:
    """Erase users: suppression list, two sweeps, tombstones (see the module docstring)."""

    def __init__(
        self,
        redis: Redis,
        forgotten: ForgetList,
        tombstones: Tombstones,
        *,
        settle_s: float = SETTLE_S,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self._redis = redis
        self._forgotten = forgotten
        self._tombstones = tombstones
        self._settle_s = settle_s
        self._clock_ms = clock_ms

    async def forget(
        self, requests: Sequence[ForgetRequest], *, dry_run: bool = False
    ) -> list[ForgetReport]:
        start = time.monotonic()
        erase: dict[str, int] = {}
        for r in requests:
            erase[r.user_id] = max(erase.get(r.user_id, r.ts), r.ts)
        users = list(erase)
        if not dry_run:
            await self._forgotten.add(erase, now_ms=self._clock_ms())
        first = await find_user_keys(self._redis, users)
        late: dict[str, list[Any]] = {}
        landed: dict[str, dict[str, Any]] = {}
        if not dry_run:
            await delete_keys(self._redis, chain.from_iterable(first.values()))
            await asyncio.sleep(self._settle_s)
            late = await find_user_keys(self._redis, users)
            await delete_keys(self._redis, chain.from_iterable(late.values()))
            landed = await self._tombstones(users)
        warnings = []
        if not self._forgotten.keyed:
            warnings.append(
                "SHOPREC_FORGET_HASH_KEY is empty: the suppression list's unkeyed hashes can "
                "be reversed by hashing candidate ids; set a secret key"
            )
        seconds = round(time.monotonic() - start, 3)
        return [
            ForgetReport(
                user=redact.user_ref(u),
                erase_ts=erase[u],
                suppression_key=self._forgotten.key,
                suppression_member=self._forgotten.hash(u),
                suppression_kept_s=self._forgotten.retention_s,
                removed=by_prefix(first.get(u, [])),
                removed_late=by_prefix(late.get(u, [])),
                tombstone=landed.get(u),
                dry_run=dry_run,
                seconds=seconds,
                warnings=list(warnings),
            )
            for u in users
        ]


class KafkaTombstones:
    """Tombstones on ``recs.out`` from a producer of its own (started on first use)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.topic = settings.topic(RECS_OUT)
        self._producer: AIOKafkaProducer | None = None

    async def __call__(self, user_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        if self._producer is None:
            producer = AIOKafkaProducer(**kafka_options(self._settings), acks="all")
            await producer.start()
            self._producer = producer
        sent: list[Awaitable[Any]] = [
            await self._producer.send(self.topic, None, key=u.encode()) for u in user_ids
        ]
        acks = await asyncio.gather(*sent)
        return {
            u: {"topic": m.topic, "partition": m.partition, "offset": m.offset}
            for u, m in zip(user_ids, acks, strict=True)
        }

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


class ControlHandler:
    """The control agent's body without Faust: validate erase requests, forget the users.

    A record that is not a valid request goes to the dead-letter topic with its reason
    (nothing silently dropped); the valid ones of a micro-batch are erased together, one
    settle wait for all.
    """

    def __init__(
        self,
        forgetter: Forgetter,
        limits: Limits,
        clock_ms: Callable[[], int] = now_ms,
        tombstones: KafkaTombstones | None = None,
    ) -> None:
        self._forgetter = forgetter
        self._limits = limits
        self._clock_ms = clock_ms
        self._tombstones = tombstones  # closed with the handler

    @classmethod
    def open(cls, settings: Settings, redis: Redis, limits: Limits) -> ControlHandler:
        """A handler on the worker's Redis, with a producer of its own for the tombstones."""
        tombstones = KafkaTombstones(settings)
        forgetter = Forgetter(redis, ForgetList.from_settings(redis, settings), tombstones)
        return cls(forgetter, limits, tombstones=tombstones)

    async def close(self) -> None:
        if self._tombstones is not None:
            await self._tombstones.close()

    async def handle(self, records: Sequence[RawRecord]) -> list[DeadLetter]:
        requests: list[ForgetRequest] = []
        dead: list[DeadLetter] = []
        now = self._clock_ms()
        for r in records:
            try:
                requests.append(parse_control(r.key, r.value, now_ms=now, limits=self._limits))
            except InvalidEvent as exc:
                dead.append(
                    DeadLetter(
                        exc.reason, exc.detail, r.topic, r.partition, r.offset, r.key, r.value
                    )
                )
        if requests:
            reports = await retry("forget users", lambda: self._forgetter.forget(requests))
            for rep in reports:
                log.info(
                    "forgot %s: %d keys removed (%d late), tombstone %s",
                    rep.user,
                    rep.keys_removed,
                    sum(len(v) for v in rep.removed_late.values()),
                    rep.tombstone,
                    extra={"user": rep.user},
                )
        return dead
