"""Faust's aiokafka transport with the consumer fetch wait shoprec configures.

faust-streaming 0.15 hard-codes ``fetch_max_wait_ms=1500`` for the worker's consumer.
Apache Kafka answers a fetch as soon as a record arrives, so there the wait only paces
idle polling; Tansu holds every fetch for the whole wait, which put 457 ms (p50,
measured) on the worker's broker-in hop and made ``--broker tansu`` useless for
watching latency.  :class:`StreamApp` builds the transport below, whose consumer
thread sets ``SHOPREC_CONSUMER_FETCH_MAX_WAIT_MS`` on the consumer Faust creates.
"""

from __future__ import annotations

from typing import Any, cast

import aiokafka
import faust
from faust.transport.drivers import aiokafka as driver
from faust.types import TransportT


class _ConsumerThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: driver.Transport) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka hands this to its fetcher in start(), which has not run yet; Faust
        # passes no way to set it, so the attribute is the only seam (pinned versions).
        consumer._fetch_max_wait_ms = cast(Transport, transport).fetch_max_wait_ms
        return consumer


class _Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> driver.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(driver.Transport):
    Consumer = _Consumer

    def __init__(self, *args: Any, fetch_max_wait_ms: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fetch_max_wait_ms = fetch_max_wait_ms


class StreamApp(faust.App):
    """``faust.App`` whose consumer waits at most ``fetch_max_wait_ms`` per empty fetch."""

    def __init__(self, *args: Any, fetch_max_wait_ms: int, **kwargs: Any) -> None:
        self.fetch_max_wait_ms = fetch_max_wait_ms
        super().__init__(*args, **kwargs)

    def _new_transport(self) -> TransportT:
        return Transport(self.conf.broker_consumer, self, fetch_max_wait_ms=self.fetch_max_wait_ms)
