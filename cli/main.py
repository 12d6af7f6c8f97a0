"""`shoprec`: run and operate the streaming recommender.

Every command reads the SHOPREC_* settings (see `shoprec config`); a flag
overrides the setting it names.  `shoprec stack up` writes the endpoints of
the stack it started to .shoprec/stack.env, so later commands in the same
folder find it without any variable set.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import orjson
from pydantic import SecretStr

from shoprec.errors import ShoprecError
from shoprec.redact import url_without_password
from shoprec.settings import ENV_PREFIX, Settings, load_settings

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_REPO = REPO_ROOT / "model_repo"


def _settings(**overrides: Any) -> Settings:
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except Exception as exc:
        raise click.ClickException(f"invalid settings: {exc}") from exc


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except ShoprecError as exc:
        raise click.ClickException(str(exc)) from exc


def _echo_json(obj: Any) -> None:
    click.echo(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode())


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG level.")
def main(verbose: bool) -> None:
    """shoprec: real-time recommendations from live shop events.

    \b
    Quick start (two terminals):
      shoprec stack up                    # Kafka, Redis, Triton on loopback
      shoprec worker                      # the stream agents
      shoprec produce --data ../shared/data/rees46-sample --rate 200
      shoprec recs tail
      shoprec stack down
    Or all of it at once: shoprec demo

    Settings come from SHOPREC_* environment variables (`shoprec config` lists
    them); `stack up` records its endpoints in .shoprec/stack.env for later commands.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Library chatter (aiokafka's re-assignments, faiss' loader trying CPU variants) buries
    # what the tool says; their warnings still show.
    for noisy in ("aiokafka", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# --- stack ---------------------------------------------------------------------------------


@main.group()
def stack() -> None:
    """Start, stop and check the local stack (broker, Redis, Triton)."""


@stack.command("up")
@click.option(
    "--broker",
    type=click.Choice(["kafka", "tansu"]),
    help="Apache Kafka (KRaft, from Maven Central jars) or Tansu (instant, memory only). "
    "[env SHOPREC_BROKER]",
)
@click.option(
    "--without",
    multiple=True,
    type=click.Choice(["broker", "redis", "triton"]),
    help="Leave a component out (repeatable), e.g. to use an external Redis.",
)
@click.option(
    "--model-repo",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_MODEL_REPO,
    show_default=True,
    help="Triton model repository to serve.",
)
@click.option("--timeout", default=240.0, show_default=True, help="Seconds to wait for health.")
@click.option(
    "--cluster",
    is_flag=True,
    help="The cluster profile: 3 Kafka nodes (topics with 3 replicas, min.insync.replicas 2), "
    "a Redis Cluster of 3 primaries and 3 replicas, 2 Tritons (about 4.3 GiB). Ports are "
    "free ones unless SHOPREC_*_PORT name bases (each node takes the next).",
)
def stack_up(
    broker: str | None, without: tuple[str, ...], model_repo: Path, timeout: float, cluster: bool
) -> None:
    """Start the stack on loopback and wait until every part is healthy.

    Ports come from SHOPREC_KAFKA_PORT, SHOPREC_REDIS_PORT, SHOPREC_TRITON_*_PORT
    (0 = any free port).  The endpoints are written to .shoprec/stack.env; the
    topics are created, with the cluster's replication factor under --cluster.
    Then start workers with `shoprec worker` (several: SHOPREC_METRICS_PORT=0 each).
    """
    from infra.stack import Stack

    settings = _settings(broker=broker)
    components = tuple(c for c in ("broker", "redis", "triton") if c not in without)
    try:
        endpoints = Stack(settings, model_repo=model_repo).up(
            components, timeout_s=timeout, cluster=cluster
        )
    except ShoprecError as exc:
        raise click.ClickException(str(exc)) from exc
    if "broker" in components:
        topics = _settings(
            kafka_bootstrap=endpoints.kafka_bootstrap,
            kafka_replication_factor=endpoints.kafka_replication_factor,
        )
        _run(_ensure_topics(topics))
    _echo_json(dataclasses.asdict(endpoints))


async def _ensure_topics(settings: Settings) -> None:
    from streams.topics import ensure_topics

    await ensure_topics(settings)


@stack.command("down")
@click.option(
    "--wipe",
    is_flag=True,
    help="Also delete every part's folder in the stack folder: the brokers' topics, Redis, "
    "Triton's and the cluster nodes' data and logs.",
)
def stack_down(wipe: bool) -> None:
    """Stop every part of the stack; no process is left behind."""
    from infra.stack import Stack

    Stack(_settings(), model_repo=DEFAULT_MODEL_REPO).down(wipe=wipe)
    click.echo("stack stopped")


@stack.command("status")
@click.option("--json", "as_json", is_flag=True, help="The whole report as JSON.")
def stack_status(as_json: bool) -> None:
    """Show each part's pid, port and health (exit 1 if any part is down); on a cluster
    also the leader of every partition and the hash slots and replicas of each primary."""
    from infra.stack import Stack

    status = Stack(_settings(), model_repo=DEFAULT_MODEL_REPO).status()
    if as_json:
        _echo_json(status)
    else:
        click.echo(format_status(status))
    if not status or not all(s.get("healthy") for s in status.values()):
        sys.exit(1)


def format_status(status: dict[str, dict[str, Any]]) -> str:
    """``Stack.status()`` as text: one line per part, then each cluster's assignments."""
    if not status:
        return "no stack is running here (`shoprec stack up`)"
    parts = {role: p for role, p in status.items() if not role.endswith("-cluster")}
    rows = [("part", "kind", "pid", "port", "state", "role")]
    for role, p in parts.items():
        state = "healthy" if p.get("healthy") else "up, not ready" if p.get("alive") else "DOWN"
        cluster_role = p.get("cluster_role", "")
        if p.get("cluster_failed"):
            cluster_role += " (marked failed)"
        rows.append(
            (
                role,
                str(p.get("kind", "")),
                str(p.get("pid", "")),
                str(p.get("port", "")),
                state,
                cluster_role,
            )
        )
    lines = _table(rows)
    kafka = status.get("kafka-cluster")
    if kafka is not None:
        lines += ["", _cluster_head("Kafka cluster", kafka)]
        if "error" not in kafka:
            lines.append(
                f"  brokers {', '.join(kafka['brokers'])}; "
                f"replication factor {kafka['replication_factor']}, "
                f"min.insync.replicas {kafka['min_insync_replicas']}"
            )
            topic_rows = [("  topic", "leader of partition 0, 1, ...")]
            for topic, leaders in kafka["leaders"].items():
                if topic.startswith("__"):
                    continue  # Kafka's own (offsets): 50 partitions of noise
                shown = " ".join(f"{i}:{leader or 'NONE'}" for i, leader in enumerate(leaders))
                topic_rows.append((f"  {topic}", shown))
            lines += _table(topic_rows)
            under = kafka.get("under_replicated") or {}
            lines.append(
                "  under-replicated: "
                + ("none" if not under else "; ".join(f"{t} {ps}" for t, ps in under.items()))
            )
    redis_part = status.get("redis-cluster")
    if redis_part is not None:
        lines += ["", _cluster_head("Redis Cluster", redis_part)]
        if "error" not in redis_part:
            lines.append(
                f"  state {redis_part['state']}, {redis_part['slots_ok']} of 16384 slots ok, "
                f"{redis_part['known_nodes']} nodes"
            )
            slot_rows = [("  primary", "hash slots", "replicas")]
            for role, p in redis_part["primaries"].items():
                slot_rows.append(
                    (f"  {role}", " ".join(p["slots"]), ", ".join(p["replicas"]) or "NONE")
                )
            lines += _table(slot_rows)
    return "\n".join(lines)


def _cluster_head(name: str, part: dict[str, Any]) -> str:
    state = "healthy" if part.get("healthy") else "NOT healthy"
    return f"{name}: {state}" + (f" ({part['error']})" if "error" in part else "")


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


# --- worker --------------------------------------------------------------------------------


@main.command()
@click.option("--loglevel", default="info", show_default=True, help="Faust worker log level.")
def worker(loglevel: str) -> None:
    """Run the stream agents (ingest + catalog) until stopped with Ctrl-C / SIGTERM.

    Checks first that Kafka, Redis and Triton answer, and creates missing topics;
    a dependency that is down stops the worker at once with the reason.
    """
    from streams.worker import preflight, run_worker

    settings = _settings()
    _run(preflight(settings))
    run_worker(settings, loglevel)


# --- data in -------------------------------------------------------------------------------

_DATA = click.option(
    "--data",
    "data",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Dataset folder with items.jsonl.gz and events.jsonl.gz "
    "(e.g. ../shared/data/rees46-sample).",
)


@main.group()
def catalog() -> None:
    """Catalogue commands."""


@catalog.command("load")
@_DATA
@click.option("--limit", type=int, help="Load at most this many items.")
def catalog_load(data: Path, limit: int | None) -> None:
    """Publish a dataset's items.jsonl.gz to catalog.items (the worker embeds them)."""
    from ops.produce import produce_catalog, start_producer
    from streams.topics import TopicNames, ensure_topics

    settings = _settings()

    async def go() -> int:
        await ensure_topics(settings)
        producer = await start_producer(settings)
        try:
            return await produce_catalog(producer, TopicNames.from_settings(settings), data, limit)
        finally:
            await producer.stop()

    click.echo(f"published {_run(go())} catalogue records to {settings.topic('catalog.items')}")


@main.command()
@_DATA
@click.option(
    "--rate",
    type=float,
    help="Events per second, open loop (default: as fast as the broker takes them).",
)
@click.option("--speedup", type=float, help="Play the recorded gaps this many times faster.")
@click.option("--limit", type=int, help="Stop after this many events.")
@click.option("--no-catalog", is_flag=True, help="Skip the catalogue (already loaded).")
@click.option(
    "--keep-ts",
    is_flag=True,
    help="Keep the recorded event times instead of stamping each event when it is sent.",
)
def produce(
    data: Path,
    rate: float | None,
    speedup: float | None,
    limit: int | None,
    no_catalog: bool,
    keep_ts: bool,
) -> None:
    """Stream a real dataset as live events: catalogue first, then events in time order.

    Without --rate or --speedup, events go as fast as the broker takes them.
    """
    from ops.produce import Pacing, produce_dataset
    from streams.topics import ensure_topics

    settings = _settings()
    pacing = Pacing(rate=rate, speedup=speedup, limit=limit, retime=not keep_ts)

    def progress(n: int) -> None:
        if n % 1000 == 0:
            click.echo(f"\r{n} events sent", nl=False, err=True)

    async def go() -> Any:
        await ensure_topics(settings)
        return await produce_dataset(settings, data, pacing, not no_catalog, progress)

    report = _run(go())
    click.echo(err=True)
    _echo_json(dataclasses.asdict(report))


# --- data out ------------------------------------------------------------------------------


@main.group()
def recs() -> None:
    """Read the recommendations on recs.out."""


@recs.command("tail")
@click.option("--user", help="Only this user's recommendations.")
@click.option("--from-beginning", is_flag=True, help="Start at the oldest retained record.")
@click.option("--limit", type=int, help="Stop after this many recommendations.")
@click.option("--timeout", type=float, help="Stop after this many idle seconds.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document per line.")
def recs_tail(
    user: str | None, from_beginning: bool, limit: int | None, timeout: float | None, as_json: bool
) -> None:
    """Follow recs.out and print each recommendation (Ctrl-C to stop)."""
    from ops.tail import format_recommendation, tail_topic
    from streams.topics import RECS_OUT

    settings = _settings()

    async def go() -> None:
        async for value in tail_topic(
            settings, settings.topic(RECS_OUT), from_beginning, limit, timeout, key=user
        ):
            click.echo(value.decode() if as_json else format_recommendation(value))

    with contextlib.suppress(KeyboardInterrupt):
        _run(go())


# --- the rest ------------------------------------------------------------------------------


@main.command()
@click.option("--markdown", is_flag=True, help="As the README's configuration table.")
def config(markdown: bool) -> None:
    """Show every setting: its variable, current value and meaning."""
    settings = _settings()
    if markdown:
        click.echo("| variable | default | meaning |\n|-|-|-|")
    for name, field in Settings.model_fields.items():
        var, desc = f"{ENV_PREFIX}{name.upper()}", field.description or ""
        if markdown:
            click.echo(f"| `{var}` | `{_shown(name, field.default)}` | {desc} |")
        else:
            click.echo(f"{var}={_shown(name, getattr(settings, name))}\n    {desc}")


def _shown(name: str, value: Any) -> Any:
    """Secrets stay secret: a Redis URL is shown without its password, others as ***."""
    if isinstance(value, SecretStr):
        secret = value.get_secret_value()
        if name == "redis_url":
            return url_without_password(secret)
        return "***" if secret else ""
    return value


@main.command()
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=REPO_ROOT.parent / "shared" / "data" / "rees46-sample",
    show_default=True,
    help="Dataset to stream.",
)
@click.option("--events", default=3000, show_default=True, help="Events to stream.")
@click.option("--rate", default=100.0, show_default=True, help="Offered events per second.")
@click.option("--broker", type=click.Choice(["kafka", "tansu"]), default="kafka", show_default=True)
@click.option("--keep-stack", is_flag=True, help="Leave the stack running afterwards.")
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the summary to this file.",
)
def demo(
    data: Path, events: int, rate: float, broker: str, keep_stack: bool, json_out: Path | None
) -> None:
    """Start everything, stream real events, show recommendations and latencies, stop.

    Uses fixed ports (SHOPREC_*_PORT) and the stack directory .shoprec; stop a
    running stack first (`shoprec stack down`).
    """
    from cli.demo import DemoOptions, run_demo

    opts = DemoOptions(data, events, rate, broker, keep_stack, json_out)
    try:
        run_demo(opts, DEFAULT_MODEL_REPO)
    except ShoprecError as exc:
        raise click.ClickException(str(exc)) from exc


def _register_subcommands() -> None:
    """Commands that live in their own modules, one per area of work."""
    from cli.api import COMMANDS as API_COMMANDS
    from cli.bench import bench
    from cli.experiment import experiment
    from cli.model import COMMANDS as MODEL_COMMANDS
    from cli.ops import COMMANDS as OPS_COMMANDS

    main.add_command(bench)
    main.add_command(experiment)
    for command in (*OPS_COMMANDS, *MODEL_COMMANDS, *API_COMMANDS):
        main.add_command(command)


_register_subcommands()

if __name__ == "__main__":
    main()
