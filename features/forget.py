"""Erasing a user from Redis, and the suppression list that keeps them erased.

Two parts, both plain Redis (the orchestration, with the ``recs.out`` tombstone, is
``streams.control.Forgetter``):

* **The sweep.**  Everything stored about one user lives under their hash tag
  ``{u:<id>}`` (``features.keys``), under any key prefix: the live state, a replay's
  shadow (``replay:``), a rebuild (``rebuild:``), a drill's own.  :func:`find_user_keys`
  SCANs the whole keyspace for that tag (every node of a Redis Cluster) and
  :func:`parse_user_key` keeps only keys whose tag is exactly the user's, so a key added
  later under the tag (attribution, a cached list) is found without being listed here.
  SCAN walks every key: seconds per million keys, for a request that is rare.
* **The suppression list** (:class:`ForgetList`): a sorted set per topic namespace
  (``<topic prefix>forget:users``) of the user id's keyed BLAKE2b hash (key
  ``SHOPREC_FORGET_HASH_KEY``) -> erase time (ms).  The erased user's events are still
  retained in the topics; the live worker, replay and rebuild drop those with an event
  time at or before the erase time (:func:`suppressed`).  Later events are a new
  relationship the user started after asking, and are processed.  Entries live
  ``SHOPREC_TOPIC_RETENTION_S``: by then the retained events they suppress are gone from
  the topics.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, cast

from redis.asyncio import Redis

from features import keys
from shoprec.settings import Settings

# 128 bits: no two users of any shop collide.  BLAKE2b is a MAC in its own right (its
# keyed mode), and the worker hashes every user of every micro-batch: 0.63 CPU-us per id
# against 1.25 for HMAC-SHA256 (median of 10 alternating rounds of 50,000 ids).
HASH_BYTES = 16
HASH_HEX_CHARS = 2 * HASH_BYTES
_SCAN_COUNT = 10_000


def suppressed(erase_ts: int | None, event_ts: int) -> bool:
    """The rule: an event of an erased user is dropped when it happened at or before the
    erase request (event time against request time); a later one is processed."""
    return erase_ts is not None and event_ts <= erase_ts


@dataclass(frozen=True, slots=True)
class UserKey:
    """A key stored under one user's hash tag."""

    key: bytes  # as stored, to delete it byte for byte
    prefix: str  # "" is the live state's prefix when SHOPREC_STATE_PREFIX is empty
    user: str
    suffix: str  # "emb", "meta", ...; whatever a later feature adds


def parse_user_key(key: bytes | str) -> UserKey | None:
    """``<prefix>{u:<user>}:<suffix>`` split up, or None for a key that is not per user.

    The prefix holds no braces (a state prefix may not); the suffix is not empty and holds
    none either, so the user is everything up to the last ``}``: an id that itself
    contains ``}:`` is still told apart from another user's key.
    """
    raw = key if isinstance(key, bytes) else key.encode("utf-8", "surrogatepass")
    text = raw.decode("utf-8", "surrogateescape")
    start = text.find("{")
    if start < 0 or not text.startswith("{u:", start) or "}" in text[:start]:
        return None
    end = text.rfind("}")
    if end < start + 3:
        return None
    tail = text[end + 1 :]
    if len(tail) < 2 or tail[0] != ":" or "{" in tail:
        return None
    return UserKey(raw, text[:start], text[start + 3 : end], tail[1:])


async def find_user_keys(redis: Redis, users: Collection[str]) -> dict[str, list[UserKey]]:
    """Every key of each of ``users``, under every prefix (one SCAN of the keyspace)."""
    wanted = set(users)
    if not wanted:
        return {}
    if len(wanted) == 1:
        (only,) = wanted
        pattern = f"*{keys.glob_escape(keys.user_tag(only))}*"
    else:
        pattern = "*{u:*"
    found: dict[str, list[UserKey]] = {u: [] for u in wanted}
    async for raw in redis.scan_iter(match=pattern, count=_SCAN_COUNT):
        parsed = parse_user_key(cast(bytes, raw))
        if parsed is not None and parsed.user in wanted:
            found[parsed.user].append(parsed)
    for found_keys in found.values():
        found_keys.sort(key=lambda k: (k.prefix, k.suffix))
    return found


async def delete_keys(redis: Redis, found: Iterable[UserKey]) -> int:
    """Delete these keys; returns how many existed."""
    todo = [k.key for k in found]
    if not todo:
        return 0
    async with redis.pipeline(transaction=False) as pipe:
        for key in todo:
            pipe.unlink(key)
        return sum(int(n) for n in await pipe.execute())


def by_prefix(found: Iterable[UserKey]) -> dict[str, list[str]]:
    """Suffixes per prefix: what an erase report says, without the user id in key names."""
    out: dict[str, list[str]] = {}
    for k in found:
        out.setdefault(k.prefix, []).append(k.suffix)
    return out


class _Timed(Protocol):
    @property
    def user_id(self) -> str: ...

    @property
    def ts(self) -> int: ...


E = TypeVar("E", bound=_Timed)


class ForgetList:
    """The suppression list of one topic namespace (see the module docstring)."""

    def __init__(self, redis: Redis, key: str, hash_key: bytes, retention_s: int) -> None:
        self._redis = redis
        self.key = key
        self.retention_s = retention_s
        self.keyed = bool(hash_key)
        # BLAKE2b takes keys up to 64 bytes; a longer secret is condensed first.
        self._key = hash_key if len(hash_key) <= 64 else hashlib.sha256(hash_key).digest()

    @classmethod
    def from_settings(cls, redis: Redis, settings: Settings) -> ForgetList:
        return cls(
            redis,
            keys.forgotten_users(settings.topic_prefix),
            settings.forget_hash_key.get_secret_value().encode(),
            settings.topic_retention_s,
        )

    def hash(self, user_id: str) -> str:
        """How the list names a user: never the id itself."""
        raw = user_id.encode("utf-8", "surrogatepass")
        return hashlib.blake2b(raw, key=self._key, digest_size=HASH_BYTES).hexdigest()

    async def add(self, erased: Mapping[str, int], now_ms: int | None = None) -> None:
        """Record erase requests (user id -> erase time, ms).  A user erased twice keeps
        the later time; entries older than the retention are dropped on the way."""
        if not erased:
            return
        now = int(time.time() * 1000) if now_ms is None else now_ms
        members = {self.hash(u): ts for u, ts in erased.items()}
        # One key: one Cluster slot.  Not a transaction (a cluster pipeline has none); a
        # failure raises and the erase is retried whole, which is idempotent.
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self.key, members, gt=True)
            pipe.zremrangebyscore(self.key, "-inf", f"({now - self.retention_s * 1000}")
            pipe.expire(self.key, self.retention_s)
            await pipe.execute()

    async def erased_at(self, user_ids: Collection[str]) -> dict[str, int]:
        """The erase time of each of ``user_ids`` that was erased (one round trip)."""
        users = list(dict.fromkeys(user_ids))
        if not users:
            return {}
        scores = await self._redis.zmscore(self.key, [self.hash(u) for u in users])
        return {u: int(s) for u, s in zip(users, scores, strict=True) if s is not None}

    async def drop_suppressed(self, events: Sequence[E]) -> tuple[list[E], int]:
        """``events`` without those :func:`suppressed` for their user, and how many."""
        if not events:
            return [], 0
        erased = await self.erased_at({e.user_id for e in events})
        if not erased:
            return list(events), 0
        kept = [e for e in events if not suppressed(erased.get(e.user_id), e.ts)]
        return kept, len(events) - len(kept)

    async def size(self) -> int:
        return int(await self._redis.zcard(self.key))
