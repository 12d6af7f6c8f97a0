"""Topic names, their creation, and the Kafka client options every part shares."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from shoprec.errors import ConfigError, ReplayError, StackError, describe
from shoprec.settings import Settings

log = logging.getLogger("shoprec.topics")

# Input topics by event type (DESIGN §3); one agent reads them all.
EVENT_TOPICS: Final[dict[str, str]] = {
    "click": "shop.clicks",
    "view": "shop.views",
    "cart": "shop.carts",
    "purchase": "shop.purchases",
    "search": "shop.searches",
}
CATALOG: Final = "catalog.items"
RECS_OUT: Final = "recs.out"
# Where ``shoprec replay`` publishes by default: never the live output.
RECS_REPLAY: Final = "recs.replay"
DLQ: Final = "recs.dlq"
# Requests about users rather than shop events: erase requests (streams.control).
CONTROL: Final = "shop.control"

_TOPIC_EXISTS = 36
# Leader election of a new topic's partitions takes ~0.5 s on one broker; a cluster, more.
_LEADER_WAIT_S = 30.0


@dataclass(frozen=True, slots=True)
class TopicNames:
    """Full topic names under the configured prefix."""

    events: tuple[str, ...]
    catalog: str
    recs_out: str
    dlq: str

    @classmethod
    def from_settings(cls, settings: Settings) -> TopicNames:
        return cls(
            events=tuple(settings.topic(t) for t in EVENT_TOPICS.values()),
            catalog=settings.topic(CATALOG),
            recs_out=settings.topic(RECS_OUT),
            dlq=settings.topic(DLQ),
        )

    def event_topic(self, event_type: str) -> str:
        return self.events[list(EVENT_TOPICS).index(event_type)]


def kafka_options(settings: Settings) -> dict[str, Any]:
    """Connection options for aiokafka clients (producer, consumer, admin)."""
    opts: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol.startswith("SASL"):
        opts |= {
            "sasl_mechanism": settings.kafka_sasl_mechanism,
            "sasl_plain_username": settings.kafka_sasl_username,
            "sasl_plain_password": settings.kafka_sasl_password.get_secret_value(),
        }
    ssl_context = kafka_ssl_context(settings)
    if ssl_context is not None:
        opts["ssl_context"] = ssl_context
    return opts


def kafka_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for SSL and SASL_SSL (CA and client certificate from the settings).

    A missing or unreadable file fails here, at start-up, naming the setting.
    """
    if not settings.kafka_security_protocol.endswith("SSL"):
        return None
    from aiokafka.helpers import create_ssl_context

    files = {
        "SHOPREC_KAFKA_SSL_CAFILE": settings.kafka_ssl_cafile,
        "SHOPREC_KAFKA_SSL_CERTFILE": settings.kafka_ssl_certfile,
        "SHOPREC_KAFKA_SSL_KEYFILE": settings.kafka_ssl_keyfile,
    }
    if settings.kafka_ssl_keyfile and not settings.kafka_ssl_certfile:
        raise ConfigError("SHOPREC_KAFKA_SSL_KEYFILE is set without SHOPREC_KAFKA_SSL_CERTFILE")
    try:
        context: ssl.SSLContext = create_ssl_context(
            cafile=files["SHOPREC_KAFKA_SSL_CAFILE"] or None,
            certfile=files["SHOPREC_KAFKA_SSL_CERTFILE"] or None,
            keyfile=files["SHOPREC_KAFKA_SSL_KEYFILE"] or None,
        )
    except (OSError, ssl.SSLError) as exc:
        named = ", ".join(f"{k}={v}" for k, v in files.items() if v)
        raise ConfigError(f"cannot load the Kafka TLS files ({named}): {exc}") from exc
    return context


async def ensure_topics(settings: Settings) -> None:
    """Create shoprec's topics if missing (the catalogue compacted, keyed by item id), each
    with ``SHOPREC_KAFKA_REPLICATION_FACTOR`` replicas (a topic that exists is left as it is).
    """
    names = TopicNames.from_settings(settings)
    parts, replicas = settings.topic_partitions, settings.kafka_replication_factor
    own = (*names.events, names.recs_out, names.dlq, settings.topic(CONTROL))
    wanted = [NewTopic(t, parts, replicas) for t in own]
    wanted.append(
        NewTopic(names.catalog, parts, replicas, topic_configs={"cleanup.policy": "compact"})
    )
    admin = AIOKafkaAdminClient(**kafka_options(settings), request_timeout_ms=15_000)
    try:
        await admin.start()
    except Exception as exc:
        raise StackError(
            f"cannot reach Kafka at {settings.kafka_bootstrap}: {describe(exc)}. "
            "Is the broker up? (`shoprec stack status`; SHOPREC_KAFKA_BOOTSTRAP)"
        ) from exc
    try:
        response = await admin.create_topics(wanted)
        created = []
        for topic, code, *_ in response.topic_errors:
            if code not in (0, _TOPIC_EXISTS):
                raise StackError(f"cannot create topic {topic}: Kafka error code {code}")
            if code == 0:
                created.append(topic)
                log.info("created topic %s", topic)
    finally:
        await admin.close()
    await _await_leaders(settings, created)


async def _await_leaders(settings: Settings, topics: Sequence[str]) -> None:
    """Return once the leader of every partition of ``topics`` answers.

    Kafka answers CreateTopics before the new partitions' leaders serve them (the metadata
    names a leader a moment before it takes writes); a producer that writes at once is
    refused (NotLeaderForPartition) and aiokafka logs a warning per partition per retry: a
    screen of them in the demo. Asking each leader for its end offset (ListOffsets) waits
    for exactly that, and aiokafka retries that request quietly.
    """
    if not topics:
        return
    consumer = AIOKafkaConsumer(**kafka_options(settings), request_timeout_ms=15_000)
    await consumer.start()
    try:
        deadline = asyncio.get_running_loop().time() + _LEADER_WAIT_S
        while True:
            cluster = await consumer._client.fetch_all_metadata()
            waiting = [t for t in topics if not _all_led(cluster, t)]
            if not waiting:
                break
            if asyncio.get_running_loop().time() > deadline:
                raise StackError(
                    f"Kafka elected no leader for {', '.join(waiting)} within "
                    f"{_LEADER_WAIT_S:.0f} s (`shoprec stack status`)"
                )
            await asyncio.sleep(0.1)
        # From the metadata that showed every leader: a second fetch may be answered by a
        # broker of a cluster that does not know the new topics yet.
        await consumer.end_offsets(_partitions(cluster, topics))
    finally:
        await consumer.stop()


def _all_led(cluster: Any, topic: str) -> bool:
    parts = cluster.partitions_for_topic(topic)
    return bool(parts) and all(
        (cluster.leader_for_partition(TopicPartition(topic, p)) or -1) >= 0 for p in parts
    )


async def partitions_of(consumer: AIOKafkaConsumer, topics: Sequence[str]) -> list[TopicPartition]:
    """Every partition of ``topics``; a topic the broker does not know is an error."""
    # A consumer only caches metadata of topics it subscribed to; ask for the whole cluster.
    cluster = await consumer._client.fetch_all_metadata()
    missing = [t for t in topics if t not in cluster.topics()]
    if missing:
        raise ReplayError(
            f"no such topic on the broker: {', '.join(missing)} "
            f"(names take SHOPREC_TOPIC_PREFIX; known: {', '.join(sorted(cluster.topics())[:20])})"
        )
    return _partitions(cluster, topics)


def _partitions(cluster: Any, topics: Sequence[str]) -> list[TopicPartition]:
    """Every partition of ``topics`` in this metadata, in order."""
    return [
        TopicPartition(t, p) for t in topics for p in sorted(cluster.partitions_for_topic(t) or ())
    ]
