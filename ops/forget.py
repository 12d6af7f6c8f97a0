"""``shoprec forget-user ID``: erase one user, and keep them erased.

The erase itself is :class:`streams.control.Forgetter` (the worker's control agent runs
the same for requests on ``shop.control``): the suppression list first, every key under
the user's hash tag in every prefix, a second sweep after the settle time, a tombstone
on ``recs.out``.  This module adds what an operator needs around it: a dry run, and a
check of the suppression list's lifetime against what the broker says its event topics
keep, since a user's events outliving their entry would come back in the next rebuild.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from features.connection import open_redis
from features.forget import ForgetList
from shoprec.errors import ConfigError
from shoprec.events import ForgetRequest
from shoprec.settings import Settings
from streams.control import SETTLE_S, ForgetReport, Forgetter, KafkaTombstones, now_ms
from streams.topics import EVENT_TOPICS, kafka_options

# Kafka's defaults when a topic and its broker set neither.
DEFAULT_RETENTION_MS = 7 * 86_400_000
DEFAULT_SEGMENT_MS = 7 * 86_400_000


async def forget_user(
    settings: Settings,
    user_id: str,
    *,
    dry_run: bool = False,
    settle_s: float = SETTLE_S,
    erase_ts: int | None = None,
) -> ForgetReport:
    """Erase ``user_id`` (or, ``dry_run``, say what would be erased, changing nothing)."""
    if not user_id.strip() or len(user_id) > settings.max_field_chars:
        raise ConfigError(
            f"a user id is 1 to {settings.max_field_chars} characters (SHOPREC_MAX_FIELD_CHARS)"
        )
    redis = open_redis(settings.redis_url, cluster=settings.redis_cluster, timeout_s=30.0)
    tombstones = KafkaTombstones(settings)
    try:
        forgetter = Forgetter(
            redis, ForgetList.from_settings(redis, settings), tombstones, settle_s=settle_s
        )
        request = ForgetRequest(user_id, now_ms() if erase_ts is None else erase_ts)
        (report,) = await forgetter.forget([request], dry_run=dry_run)
    finally:
        await tombstones.close()
        await redis.aclose()
    report.warnings += await retention_warnings(settings)
    return report


async def retention_warnings(settings: Settings) -> list[str]:
    """Event topics whose records may outlive a suppression entry (or why it is unknown)."""
    try:
        lifetimes = await topic_lifetimes_s(settings)
    except Exception as exc:  # a broker without DescribeConfigs (Tansu) or without the ACL
        return [
            f"could not read the event topics' retention from the broker ({type(exc).__name__}); "
            f"check that retention.ms + segment.ms <= SHOPREC_TOPIC_RETENTION_S "
            f"({settings.topic_retention_s} s)"
        ]
    return [
        f"{topic} may keep records for {life:,} s (retention.ms + segment.ms), longer than "
        f"SHOPREC_TOPIC_RETENTION_S = {settings.topic_retention_s:,} s: the user's older "
        "events could come back in a rebuild after the suppression entry expires; raise it"
        for topic, life in sorted(lifetimes.items())
        if life > settings.topic_retention_s
    ]


async def topic_lifetimes_s(settings: Settings) -> dict[str, int]:
    """The longest a record may stay in each event topic: retention.ms + segment.ms.

    Infinite retention (-1) counts as forever (a very large number).
    """
    topics = [settings.topic(t) for t in EVENT_TOPICS.values()]
    admin = AIOKafkaAdminClient(**kafka_options(settings), request_timeout_ms=10_000)
    await admin.start()
    try:
        responses = await admin.describe_configs(
            [
                ConfigResource(
                    ConfigResourceType.TOPIC, t, {"retention.ms": None, "segment.ms": None}
                )
                for t in topics
            ]
        )
    finally:
        await admin.close()
    out: dict[str, int] = {}
    for response in responses:
        for error_code, _msg, _type, name, entries, *_ in response.resources:
            if error_code != 0:
                raise ConfigError(f"describe configs of {name}: Kafka error code {error_code}")
            values: dict[str, Any] = {e[0]: e[1] for e in entries}
            retention = int(values.get("retention.ms") or DEFAULT_RETENTION_MS)
            segment = int(values.get("segment.ms") or DEFAULT_SEGMENT_MS)
            out[name] = 2**62 if retention < 0 else (retention + segment) // 1000
    return out


def format_report(report: ForgetReport) -> str:
    """The human summary ``shoprec forget-user`` prints."""
    verb = "would remove" if report.dry_run else "removed"
    erased = dt.datetime.fromtimestamp(report.erase_ts / 1000, dt.UTC)
    lines = [
        f"{'dry run: ' if report.dry_run else ''}forget user {report.user}, erase time "
        f"{erased.isoformat(timespec='seconds')}"
    ]
    total = sum(len(v) for v in report.removed.values())
    lines.append(f"  {verb} {total} keys" + (":" if total else " (no state in Redis)"))
    for prefix, suffixes in report.removed.items():
        lines.append(f"    {_prefix(prefix)}: {', '.join(suffixes)}")
    if not report.dry_run:
        late = sum(len(v) for v in report.removed_late.values())
        lines.append(
            f"  second sweep: {late} keys written meanwhile by a batch in flight"
            + "".join(f"; {_prefix(p)}: {', '.join(s)}" for p, s in report.removed_late.items())
        )
        if report.tombstone is not None:
            t = report.tombstone
            lines.append(
                f"  tombstone on {t['topic']} partition {t['partition']} offset {t['offset']}"
            )
    days = report.suppression_kept_s / 86_400
    lines.append(
        f"  suppression list {report.suppression_key}: member {report.suppression_member}, "
        f"kept {report.suppression_kept_s:,} s ({days:g} days); replay, rebuild and the worker "
        "skip the user's events up to the erase time"
        + (" (not written: dry run)" if report.dry_run else "")
    )
    lines += [f"  warning: {w}" for w in report.warnings]
    return "\n".join(lines)


def _prefix(prefix: str) -> str:
    return "prefix ''" if not prefix else f"prefix {prefix!r}"
