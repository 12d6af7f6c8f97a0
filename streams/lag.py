"""Consumer lag: how many input records a consumer group has not committed yet.

The one probe every part uses: the worker's ``shoprec_consumer_lag`` metric, the
benchmarks' drain and lag samples, the soak, and the fault tests' "caught up".

Lag is the end offset of each partition minus the group's committed offset (a
partition never committed counts from 0).  Tansu cannot report it: its ListOffsets
answers are not end offsets (measured: 4 for 10 records) and it does not speak the
admin API's OffsetFetch.  :func:`lag_is_known` says so once, here, and the probe
raises :class:`LagUnknown` there instead of returning a number that means nothing;
a caller that waits for a group to catch up must count what the workers processed
instead (see ``bench/e2e.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient

from shoprec.errors import ShoprecError
from shoprec.settings import Settings
from streams.topics import kafka_options, partitions_of


class LagUnknown(ShoprecError):
    """The broker cannot report consumer lag (Tansu)."""


def lag_is_known(settings: Settings) -> bool:
    """False on Tansu, whose offsets answers make lag meaningless."""
    return settings.broker != "tansu"


class LagProbe:
    """Lag of one group over ``topics``, per partition; its connections open on first use
    and are kept, so the worker probes every few seconds without reconnecting."""

    def __init__(self, settings: Settings, group_id: str, topics: Sequence[str]) -> None:
        self._settings = settings
        self._group = group_id
        self._topics = list(topics)
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> LagProbe:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _open(self) -> tuple[AIOKafkaAdminClient, AIOKafkaConsumer]:
        if self._admin is None or self._consumer is None:
            opts = kafka_options(self._settings)
            self._admin = AIOKafkaAdminClient(**opts)
            await self._admin.start()
            self._consumer = AIOKafkaConsumer(**opts, group_id=None, enable_auto_commit=False)
            await self._consumer.start()
        return self._admin, self._consumer

    async def per_partition(self) -> dict[tuple[str, int], int]:
        """``{(topic, partition): records not committed}``; :class:`LagUnknown` on Tansu."""
        if not lag_is_known(self._settings):
            raise LagUnknown(f"the {self._settings.broker} broker cannot report consumer lag")
        admin, consumer = await self._open()
        committed = await admin.list_consumer_group_offsets(self._group)
        tps = await partitions_of(consumer, self._topics)
        ends = await consumer.end_offsets(tps)
        lag: dict[tuple[str, int], int] = {}
        for tp in tps:
            meta = committed.get(tp)
            done = meta.offset if meta is not None and meta.offset >= 0 else 0
            lag[(tp.topic, tp.partition)] = max(0, ends[tp] - done)
        return lag

    async def total(self) -> int:
        """Records not committed over every partition of the topics."""
        return sum((await self.per_partition()).values())

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        if self._admin is not None:
            await self._admin.close()
            self._admin = None


async def group_lag(settings: Settings, group_id: str, topics: Sequence[str]) -> int:
    """One measurement with a probe of its own (opened and closed here)."""
    async with LagProbe(settings, group_id, topics) as probe:
        return await probe.total()
