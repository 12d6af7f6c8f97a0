"""The floor: a pass-through relay, Kafka in → Kafka out, with no processing at all.

``python -m bench.relay --bootstrap HOST:PORT --out TOPIC IN_TOPIC...`` consumes
the input topics and produces every record unchanged (same key, same value) to
the output topic, with the client settings the worker uses.  Its latency is
the physical limit of the Kafka-in, Kafka-out shape on the same broker and
cores: the benchmark reports the worker's figures next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer


def relay_consumer(
    bootstrap: str, inputs: list[str], group: str, fetch_max_wait_ms: int
) -> AIOKafkaConsumer:
    """The relay's consumer (``bench/faust_hop.py`` measures its hop alone)."""
    return AIOKafkaConsumer(
        *inputs,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=True,
        fetch_max_wait_ms=fetch_max_wait_ms,
    )


async def relay(
    bootstrap: str, inputs: list[str], output: str, group: str, fetch_max_wait_ms: int
) -> None:
    consumer = relay_consumer(bootstrap, inputs, group, fetch_max_wait_ms)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await consumer.start()
    await producer.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("relay ready", flush=True)
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=100)
            for records in batch.values():
                for r in records:
                    await producer.send(output, r.value, key=r.key)
    finally:
        await producer.stop()
        await consumer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--out", required=True, help="Output topic.")
    parser.add_argument("--group", default="shoprec-relay")
    parser.add_argument(
        "--fetch-max-wait-ms",
        type=int,
        default=500,
        help="Kafka answers a fetch as soon as data is there; Tansu waits this long.",
    )
    parser.add_argument("inputs", nargs="+", help="Input topics.")
    args = parser.parse_args()
    asyncio.run(relay(args.bootstrap, args.inputs, args.out, args.group, args.fetch_max_wait_ms))


if __name__ == "__main__":
    main()
