"""The Faust app: topics and the two agents, which run the runtime (``streams/runtime.py``).

Read top-down, an event flows:

    shop.* topics ──► ingest agent ──► Ingestor (validate, update Redis)
                                   ──► Recommender (retrieve, rank on Triton, explain)
                                   ──► recs.out          (bad input ──► recs.dlq)
    catalog.items ──► catalog agent ──► Triton item_encoder ──► Redis item store + items:log

Agents stay thin: take a micro-batch, call the pipeline objects, publish.  The
runtime (Redis pool, Triton client, item table) opens once, before the first
batch; a dependency that cannot be reached there fails the worker loudly
instead of looping.  A dependency that fails later is retried with backoff
and the batch is not acknowledged until it went through, so nothing is lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Sequence
from typing import Any, cast

import faust

from shoprec import redact
from shoprec.dlq import DeadLetter, event_id_of
from shoprec.settings import Settings
from streams import observability
from streams.control import ControlHandler
from streams.ingest import RawRecord
from streams.runtime import Runtime, limits_from, now_ms
from streams.topics import CONTROL, TopicNames, kafka_ssl_context
from streams.transport import BatchingStream, StreamApp

log = logging.getLogger("shoprec.worker")

STATS_EVERY_S = 10.0


def micro_batches(
    stream: faust.StreamT[bytes], max_events: int, linger_s: float
) -> AsyncGenerator[Sequence[faust.EventT[bytes]], None]:
    """Batches of up to ``max_events`` of what has arrived (after ``linger_s`` from the
    first), each acknowledged only after the loop body has run through
    (``BatchingStream.take_buffered``)."""
    return cast(BatchingStream, stream).take_buffered(max_events, linger_s)


def raw_records(events: Sequence[faust.EventT[bytes]]) -> list[RawRecord]:
    return [
        RawRecord(e.message.topic, e.message.partition, e.message.offset, e.key, e.value)
        for e in events
    ]


def broker_in_ms(events: Sequence[faust.EventT[bytes]], agent_free_s: float) -> dict[str, float]:
    """Per event, mean over the batch: ``broker_in``, the time from the producer's send to
    the batch reaching the agent (producer linger, broker, fetch, Faust's hand-off, the
    batch's linger), and ``broker_in_queued``, the part of it that passed before the
    agent was done with the previous batch (at ``agent_free_s``): the agent's own
    processing time, which a faster hop cannot remove."""
    now_s = time.time()
    n = max(1, len(events))
    sent = [e.message.timestamp for e in events]
    return {
        "broker_in": 1000.0 * sum(now_s - t for t in sent) / n,
        "broker_in_queued": 1000.0 * sum(max(0.0, agent_free_s - t) for t in sent) / n,
    }


def new_faust_app(settings: Settings, **faust_options: Any) -> StreamApp:
    """The worker's Faust app, without agents (``bench/faust_hop.py`` adds its own and
    varies Faust's own options, such as the commit interval, with ``faust_options``)."""
    return StreamApp(
        settings.app_id,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        consumer_thread=settings.consumer_thread,
        broker=settings.faust_broker,
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=settings.topic_partitions,
        # Faust's own topics (changelogs, its leader topic) replicate like shoprec's.
        topic_replication_factor=settings.kafka_replication_factor,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        store="memory://",
        producer_acks=-1,
        broker_credentials=_faust_credentials(settings),
        **faust_options,
    )


def create_app(settings: Settings) -> tuple[faust.App, Runtime]:
    """Build the Faust app and its runtime; ``shoprec worker`` runs it."""
    names = TopicNames.from_settings(settings)
    app = new_faust_app(settings)
    runtime = Runtime(settings)
    events_topic = app.topic(*names.events, key_type=bytes, value_type=bytes)
    catalog_topic = app.topic(names.catalog, key_type=bytes, value_type=bytes)
    recs_topic = app.topic(names.recs_out, key_type=bytes, value_type=bytes)
    dlq_topic = app.topic(names.dlq, key_type=bytes, value_type=bytes)
    control_topic = app.topic(settings.topic(CONTROL), key_type=bytes, value_type=bytes)

    async def publish_dead(dead: Sequence[DeadLetter]) -> None:
        for d in dead:
            log.warning(
                "dead letter %s from %s[%d]@%d key %s",
                d.reason,
                d.topic,
                d.partition,
                d.offset,
                redact.user_ref(d.key),
                extra={"event_id": event_id_of(d.original), "reason": d.reason},
            )
            await dlq_topic.send(key=d.key, value=d.value(now_ms()), headers=d.headers())

    @app.agent(events_topic, name="ingest", concurrency=settings.agent_concurrency)
    async def ingest(stream: faust.StreamT[bytes]) -> None:
        await runtime.ensure_open()
        linger_s = settings.batch_within_ms / 1000.0
        agent_free_s = 0.0
        async for events in micro_batches(stream, settings.batch_max, linger_s):
            runtime.stats.record_stages(broker_in_ms(events, agent_free_s))
            recs, dead = await runtime.handle_events_isolating_failures(raw_records(events))
            acks = [
                await recs_topic.send(key=rec.user_id.encode(), value=rec.to_json()) for rec in recs
            ]
            if recs:
                runtime.confirm_when_acknowledged(acks, recs)
            await publish_dead(dead)
            agent_free_s = time.time()

    @app.agent(catalog_topic, name="catalog")
    async def catalog(stream: faust.StreamT[bytes]) -> None:
        await runtime.ensure_open()
        # Items come in loads: a batch lingers 0.1 s for more, one encoder call for them.
        async for events in micro_batches(stream, 64, 0.1):
            await publish_dead(await runtime.handle_catalog(raw_records(events)))

    @app.agent(control_topic, name="control")
    async def control(stream: faust.StreamT[bytes]) -> None:
        # Erase requests (forget_user): streams/control.py does the work; bad records
        # go to the dead-letter topic like any other input.
        await runtime.ensure_open()
        handler = ControlHandler.open(settings, runtime.redis, limits_from(settings))
        try:
            async for events in micro_batches(stream, 64, 0.5):
                await publish_dead(await handler.handle(raw_records(events)))
        finally:
            await handler.close()

    @app.on_before_shutdown.connect
    async def close_runtime(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        # Runs after the consumer stopped and before the producer flushes.
        log.info("final stats %s", runtime.stats.summary())
        await runtime.close()

    @app.timer(STATS_EVERY_S)  # type: ignore[untyped-decorator]
    async def log_stats() -> None:
        log.info("stats %s", runtime.stats.summary())

    observability.install(app, runtime.stats, settings, names.events)

    return app, runtime


def _faust_credentials(settings: Settings) -> Any:
    ssl_context = kafka_ssl_context(settings)
    if not settings.kafka_security_protocol.startswith("SASL"):
        return None if ssl_context is None else faust.SSLCredentials(ssl_context)
    return faust.SASLCredentials(
        username=settings.kafka_sasl_username,
        password=settings.kafka_sasl_password.get_secret_value(),
        mechanism=settings.kafka_sasl_mechanism,
        ssl_context=ssl_context,
    )
