"""On-call commands: `shoprec replay`, `rebuild-state`, `inspect user|item`, `dlq ...`,
`forget-user`.

Each is a thin shell over a module in ``ops/`` (replay, replay_diff,
rebuild, inspect, dlq, forget): parse, show progress on stderr, print a human
summary or ``--json`` on stdout, exit non-zero on failure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import click
import orjson
from tqdm import tqdm

from features.connection import open_redis
from shoprec.errors import ShoprecError
from shoprec.settings import Settings, load_settings
from streams.topics import RECS_REPLAY

T = TypeVar("T")

ALL_EVENTS = "all"
EXIT_INTERRUPTED = 130


def _settings() -> Settings:
    try:
        return load_settings()
    except Exception as exc:
        raise click.ClickException(f"invalid settings: {exc}") from exc


async def _until_ctrl_c(work: Callable[[asyncio.Event], Coroutine[Any, Any, T]]) -> T:
    """Run ``work(stop)`` with the first Ctrl-C setting ``stop`` instead of cancelling
    whatever is awaited at that moment (``work`` ends at its next safe point); a second
    Ctrl-C interrupts at once, as usual."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def first_ctrl_c() -> None:
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)  # the next one raises KeyboardInterrupt
        click.echo("\nstopping after this batch (Ctrl-C again to stop now) ...", err=True)

    loop.add_signal_handler(signal.SIGINT, first_ctrl_c)
    try:
        return await work(stop)
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except ShoprecError as exc:
        raise click.ClickException(str(exc)) from exc


def _echo_json(obj: Any) -> None:
    click.echo(orjson.dumps(obj, option=orjson.OPT_INDENT_2, default=str).decode())


def _topics(settings: Settings, text: str) -> tuple[str, ...]:
    from streams.topics import EVENT_TOPICS

    names: list[str] = []
    for t in filter(None, (x.strip() for x in text.split(","))):
        names += list(EVENT_TOPICS.values()) if t == ALL_EVENTS else [t]
    return tuple(settings.topic(t) for t in dict.fromkeys(names))


def _progress(total: int, desc: str) -> tuple[tqdm[Any], Callable[[int], None]]:
    bar: tqdm[Any] = tqdm(
        total=total, desc=desc, unit="ev", unit_scale=True, file=sys.stderr, smoothing=0.1
    )

    def advance(n: int, *_: int) -> None:
        bar.update(n)

    return bar, advance


_TOPIC = click.option(
    "--topic",
    "topics",
    default=ALL_EVENTS,
    show_default=True,
    help="Topics to read, comma-separated, without SHOPREC_TOPIC_PREFIX "
    "(e.g. shop.views,shop.carts); 'all' = the five event topics.",
)
_FROM = click.option(
    "--from",
    "from_time",
    metavar="TIME",
    help="Start at the first record at or after TIME (broker time index): ISO 8601 "
    "(UTC unless a zone is given), epoch ms, 'now' or relative '-2h'.",
)
_TO = click.option("--to", "to_time", metavar="TIME", help="Stop before TIME (same forms).")
_FROM_OFFSET = click.option(
    "--from-offset",
    metavar="P:O[,...]",
    help="Start offsets, PARTITION:OFFSET or TOPIC:PARTITION:OFFSET; only the partitions "
    "named are read. Works on brokers without a time index (Tansu).",
)
_TO_OFFSET = click.option(
    "--to-offset", metavar="P:O[,...]", help="End offsets (exclusive); default: the end now."
)
_JSON = click.option("--json", "as_json", is_flag=True, help="A JSON summary on stdout.")


def _spec(
    settings: Settings,
    topics: str,
    from_time: str | None,
    to_time: str | None,
    from_offset: str | None,
    to_offset: str | None,
) -> Any:
    from ops.ranges import RangeSpec, parse_offsets, parse_time

    now = int(time.time() * 1000)
    try:
        return RangeSpec(
            _topics(settings, topics),
            from_ms=None if from_time is None else parse_time(from_time, now),
            to_ms=None if to_time is None else parse_time(to_time, now),
            from_offsets=None if from_offset is None else parse_offsets(from_offset),
            to_offsets=None if to_offset is None else parse_offsets(to_offset),
        )
    except ShoprecError as exc:
        raise click.UsageError(str(exc)) from exc


# --- replay --------------------------------------------------------------------------------


@click.command()
@_TOPIC
@_FROM
@_TO
@_FROM_OFFSET
@_TO_OFFSET
@click.option(
    "--into",
    default=RECS_REPLAY,
    show_default=True,
    help="Topic for the replay's recommendations (SHOPREC_TOPIC_PREFIX applies). "
    "recs.out needs --live.",
)
@click.option(
    "--state-prefix",
    default="replay:",
    show_default=True,
    help="Shadow key prefix for the replay's state; the live prefix (SHOPREC_STATE_PREFIX) "
    "needs --live.",
)
@click.option("--dry-run", is_flag=True, help="Say what would be read and written; change nothing.")
@click.option("--rate", type=float, help="At most this many events per second.")
@click.option("--users", metavar="U,...", help="Only these users' events.")
@click.option("--limit", type=int, help="Stop after this many records; run again to resume.")
@click.option("--restart", is_flag=True, help="Ignore the checkpoint of an earlier run.")
@click.option("--live", is_flag=True, help="Allow writing to recs.out or the live state.")
@click.option(
    "--diff",
    is_flag=True,
    help="Do not replay: compare the recommendations on --into with those on --against.",
)
@click.option(
    "--against",
    default="recs.out",
    show_default=True,
    help="With --diff: the topic to compare with (live output, or another replay's topic).",
)
@click.option("--k", default=10, show_default=True, help="With --diff: overlap@K.")
@_JSON
def replay(
    topics: str,
    from_time: str | None,
    to_time: str | None,
    from_offset: str | None,
    to_offset: str | None,
    into: str,
    state_prefix: str,
    dry_run: bool,
    rate: float | None,
    users: str | None,
    limit: int | None,
    restart: bool,
    live: bool,
    diff: bool,
    against: str,
    k: int,
    as_json: bool,
) -> None:
    """Re-run a retained range of events through the live pipeline, safely.

    \b
    By default recommendations go to recs.replay (never recs.out: the push
    service is not flooded) and state to keys under "replay:" (never the live
    ones: live users are not disturbed).  Interrupt at any time; the same
    command resumes from its checkpoint.  Replaying a range twice into the same
    prefix leaves the state as it was (events are deduplicated by id).
    \b
    Examples:
      shoprec replay --topic all --from -2h --dry-run
      shoprec replay --topic shop.purchases --from 2026-11-25T02:00 --to 2026-11-25T03:00
      shoprec replay --from-offset 0:1200,1:1180 --users 541312140 --state-prefix drill1:
      shoprec replay --diff                      # recs.replay vs recs.out, overlap@10
      shoprec replay --diff --into recs.replay.v2 --against recs.replay.v1
    """
    settings = _settings()
    if diff:
        _replay_diff(settings, into, against, k, as_json)
        return
    from ops.replay import ReplayRequest
    from ops.replay import replay as run_replay

    spec = _spec(settings, topics, from_time, to_time, from_offset, to_offset)
    if not (spec.by_time or spec.from_offsets is not None or spec.to_offsets is not None):
        raise click.UsageError(
            "say which range: --from/--to TIME or --from-offset/--to-offset P:O "
            "(--from-offset 0:0 with no --to-offset replays a whole partition)"
        )
    req = ReplayRequest(
        spec=spec,
        into=settings.topic(into),
        state_prefix=state_prefix,
        rate=rate,
        users=None if users is None else frozenset(u.strip() for u in users.split(",")),
        limit=limit,
        restart=restart,
        allow_live=live,
    )
    if dry_run:
        report = _run(run_replay(settings, req, dry_run=True))
    else:
        bar: tqdm[Any] | None = None

        def progress(n: int, remaining: int) -> None:
            nonlocal bar
            if bar is None:
                bar, _ = _progress(n + remaining, "replay")
            bar.update(n)

        try:
            report = _run(
                _until_ctrl_c(lambda stop: run_replay(settings, req, progress=progress, stop=stop))
            )
        except KeyboardInterrupt:
            click.echo(
                "\ninterrupted: progress is checkpointed; run the same command to resume",
                err=True,
            )
            sys.exit(EXIT_INTERRUPTED)
        finally:
            if bar is not None:
                bar.close()
    doc = report.to_dict()
    if as_json:
        _echo_json(doc)
        return
    verb = "would read" if dry_run else "read"
    click.echo(
        f"replay {report.run_id}: {verb} {report.planned - report.resumed_from:,} records "
        f"of {report.planned:,} in {len(report.ranges)} partitions"
        + (f" (resuming after {report.resumed_from:,})" if report.resumed_from else "")
    )
    for r in report.ranges:
        click.echo(f"  {r['topic']}[{r['partition']}] offsets {r['start']}..{r['end']}")
    for w in report.writes:
        click.echo(f"  {'would write' if dry_run else 'wrote'} {w}")
    if not dry_run:
        click.echo(
            f"  {report.read:,} read, {report.processed:,} processed, "
            f"{report.recommendations:,} recommendations, {report.dead_letters:,} dead letters, "
            f"{report.duplicates:,} duplicates in {report.seconds:.1f} s "
            f"({report.events_per_s:,.0f} events/s){'' if report.complete else '  (not complete)'}"
        )
        if report.suppressed:
            click.echo(f"  {report.suppressed:,} events of erased users skipped (forget-user)")


def _replay_diff(settings: Settings, into: str, against: str, k: int, as_json: bool) -> None:
    from ops.replay_diff import diff_topics

    report = _run(diff_topics(settings, settings.topic(into), settings.topic(against), k))
    if as_json:
        _echo_json(report.to_dict())
        return
    click.echo(
        f"{report.replay_topic} vs {report.base_topic}: {report.compared:,} triggers compared, "
        f"{report.identical:,} identical, {report.reordered:,} reordered, "
        f"{report.changed:,} changed; mean overlap@{k} {report.mean_overlap:.3f}"
    )
    click.echo(
        f"  only in {report.replay_topic}: {report.only_in_replay:,}; "
        f"only in {report.base_topic}: {report.only_in_base:,}"
    )
    click.echo(f"  models: {report.models}")
    for ex in report.examples:
        click.echo(f"  e.g. {ex}")


# --- rebuild-state ---------------------------------------------------------------------------


@click.command("rebuild-state")
@_TOPIC
@_FROM
@_TO
@_FROM_OFFSET
@_TO_OFFSET
@click.option(
    "--state-prefix",
    default="rebuild:",
    show_default=True,
    help="Key prefix to rebuild into (must hold no user state unless --force). "
    "'' rebuilds the live state, e.g. after Redis lost its data.",
)
@click.option(
    "--shards", default=4, show_default=True, help="With --exact: concurrent Redis pipelines."
)
@click.option("--chunk", default=2000, show_default=True, help="With --exact: events per pipeline.")
@click.option("--force", is_flag=True, help="Rebuild into a prefix that already holds state.")
@click.option(
    "--exact",
    is_flag=True,
    help="Send every event through the worker's update script (Lua) instead of folding "
    "in Python: the very same code as live, about 15 times slower.",
)
@click.option(
    "--verify-against",
    metavar="PREFIX",
    help="Afterwards compare the rebuilt state with the state under PREFIX "
    "(default: the live one, SHOPREC_STATE_PREFIX); exit 1 when they differ.",
)
@click.option("--no-verify", is_flag=True, help="Skip the comparison.")
@_JSON
def rebuild_state(
    topics: str,
    from_time: str | None,
    to_time: str | None,
    from_offset: str | None,
    to_offset: str | None,
    state_prefix: str,
    shards: int,
    chunk: int,
    force: bool,
    exact: bool,
    verify_against: str | None,
    no_verify: bool,
    as_json: bool,
) -> None:
    """Rebuild users' Redis state from the retained event topics, fast (no ranking, no output).

    \b
    Reads every retained event (or the range given), folds it into state with
    the worker's own update script in large pipelines, then checks the result
    key by key against the live state.  Measured on this 2-core machine: see
    the README's Operations section.
    \b
    Examples:
      shoprec rebuild-state                          # into rebuild:, verify against live
      shoprec rebuild-state --state-prefix '' --no-verify   # Redis lost its data
    """

    from ops.rebuild import compare_state
    from ops.rebuild import rebuild_state as run_rebuild

    settings = _settings()
    spec = _spec(settings, topics, from_time, to_time, from_offset, to_offset)
    against = settings.state_prefix if verify_against is None else verify_against
    if not no_verify and against == state_prefix:
        raise click.UsageError("--verify-against must name another prefix than --state-prefix")
    bar, advance = _progress(0, "rebuild")

    async def plan_then_rebuild() -> Any:
        from ops.ranges import open_reader, plan_ranges

        consumer = await open_reader(settings)
        try:
            bar.total = sum(r.size for r in await plan_ranges(consumer, spec))
        finally:
            await consumer.stop()
        report = await run_rebuild(
            settings,
            spec,
            state_prefix,
            shards=shards,
            chunk=chunk,
            force=force,
            exact=exact,
            progress=advance,
        )
        if not no_verify:
            redis = open_redis(settings.redis_url, cluster=settings.redis_cluster, timeout_s=60.0)
            try:
                report.verify = (await compare_state(redis, state_prefix, against)).to_dict()
            finally:
                await redis.aclose()
        return report

    try:
        report = _run(plan_then_rebuild())
    finally:
        bar.close()
    doc = report.to_dict()
    if as_json:
        _echo_json(doc)
    else:
        click.echo(
            f"rebuilt {report.read:,} events into {state_prefix!r} in {report.seconds:.1f} s "
            f"({report.events_per_s:,.0f} events/s; {report.applied:,} applied, "
            f"{report.duplicates:,} duplicates, {report.dead_letters:,} rejected"
            + (f", {report.suppressed:,} of erased users skipped)" if report.suppressed else ")")
        )
        if report.verify is not None:
            v = report.verify
            click.echo(
                f"verify against {against!r}: {'EQUAL' if v['equal'] else 'DIFFERENT'} — "
                f"{v['users_equal']:,} of {v['users_a']:,} users equal, {v['only_in_a']:,} only "
                f"rebuilt, {v['only_in_b']:,} only live, mismatched fields {v['mismatched']}, "
                f"{v['global_mismatched']:,} of {v['global_keys']:,} global keys differ"
            )
            for ex in v["examples"]:
                click.echo(f"  e.g. {ex}")
    if report.verify is not None and not report.verify["equal"]:
        sys.exit(1)


# --- inspect ---------------------------------------------------------------------------------


@click.group()
def inspect() -> None:
    """Look at one user's or item's state (read-only)."""


_PREFIX = click.option(
    "--state-prefix",
    help="Inspect the state under this prefix (a replay's shadow); default the live one.",
)


@inspect.command("user")
@click.argument("user_id")
@_PREFIX
@click.option(
    "--recs",
    "n_recs",
    default=3,
    show_default=True,
    help="Last recommendations to show from recs.out (0 = skip reading the topic).",
)
@click.option("--history", "n_hist", default=10, show_default=True, help="History lines.")
@_JSON
def inspect_user(
    user_id: str, state_prefix: str | None, n_recs: int, n_hist: int, as_json: bool
) -> None:
    """A user's rolling embedding, counters, recent history and last recommendations."""
    from ops.inspect import format_user
    from ops.inspect import inspect_user as run

    settings = _settings()
    prefix = settings.state_prefix if state_prefix is None else state_prefix
    doc = _run(run(settings, user_id, prefix, n_recs, n_hist))
    _echo_json(doc) if as_json else click.echo(format_user(doc))


@inspect.command("item")
@click.argument("item_id")
@_PREFIX
@_JSON
def inspect_item(item_id: str, state_prefix: str | None, as_json: bool) -> None:
    """An item's catalogue record, embedding, nearest items, co-visitation, co-purchase
    (the complements a list after buying it offers), popularity."""
    from ops.inspect import format_item
    from ops.inspect import inspect_item as run

    settings = _settings()
    prefix = settings.state_prefix if state_prefix is None else state_prefix
    doc = _run(run(settings, item_id, prefix))
    _echo_json(doc) if as_json else click.echo(format_item(doc))


# --- dlq -------------------------------------------------------------------------------------


@click.group()
def dlq() -> None:
    """Read the dead-letter topic recs.dlq, and re-inject dead letters once fixed."""


@dlq.command("tail")
@click.option("--from-beginning", is_flag=True, help="Start at the oldest retained record.")
@click.option("--limit", type=int, help="Stop after this many dead letters.")
@click.option("--timeout", type=float, help="Stop after this many idle seconds.")
def dlq_tail(from_beginning: bool, limit: int | None, timeout: float | None) -> None:
    """Follow dead letters as they arrive, with their reason and origin."""
    from ops.tail import tail_topic
    from streams.topics import DLQ

    settings = _settings()

    async def go() -> None:
        async for value in tail_topic(
            settings, settings.topic(DLQ), from_beginning, limit, timeout
        ):
            click.echo(value.decode())

    _run(go())


_REASON = click.option("--reason", "reasons", multiple=True, help="Only this reason (repeatable).")


@dlq.command("list")
@_REASON
@click.option("--latest", default=20, show_default=True, help="Latest dead letters to list.")
@_JSON
def dlq_list(reasons: tuple[str, ...], latest: int, as_json: bool) -> None:
    """Count the retained dead letters by reason and source, and list the latest."""
    from ops.dlq import read_letters, select, summarise

    settings = _settings()
    summary = summarise(select(_run(read_letters(settings)), reasons), latest)
    if as_json:
        _echo_json(dataclasses.asdict(summary))
        return
    click.echo(f"{summary.total:,} dead letters on {settings.topic('recs.dlq')}")
    for reason, n in summary.by_reason.items():
        click.echo(f"  {n:>7,}  {reason}")
    sources = ", ".join(f"{t} {n:,}" for t, n in summary.by_source_topic.items())
    click.echo(f"by source topic: {sources}")
    for x in summary.latest:
        click.echo(
            f"  {x['dlq']:>10}  {x['reason']:<16} {x['source']:<28} "
            f"event {x['event_id'] or '-'}  {x['detail'][:60]}"
        )


@dlq.command("show")
@click.argument("ref", metavar="PARTITION:OFFSET")
def dlq_show(ref: str) -> None:
    """One dead letter in full: reason, detail, origin, the original record."""
    from ops.dlq import read_letters, select, show

    settings = _settings()
    found = select(_run(read_letters(settings)), refs=[ref])
    if not found:
        raise click.ClickException(f"no dead letter at {ref} (see `shoprec dlq list`)")
    _echo_json(show(found[-1]))


@dlq.command("replay")
@_REASON
@click.option("--ref", "refs", multiple=True, metavar="P:O", help="Only this dead letter.")
@click.option("--source-topic", help="Only letters from this topic (full name).")
@click.option("--into", help="Send to this topic instead of each letter's source topic.")
@click.option("--dry-run", is_flag=True, help="Say what would be sent; send nothing.")
@click.option("--again", is_flag=True, help="Also send letters re-injected before.")
@_JSON
def dlq_replay(
    reasons: tuple[str, ...],
    refs: tuple[str, ...],
    source_topic: str | None,
    into: str | None,
    dry_run: bool,
    again: bool,
    as_json: bool,
) -> None:
    """Re-inject dead letters (original bytes and key) into the topic they came from.

    \b
    Do this once their cause is fixed (a catalogue record arrived, a bug was
    deployed away).  Each letter is sent at most once unless --again; select
    with --reason and/or --ref, or everything.
    Example: shoprec dlq replay --reason processing_error --dry-run
    """
    from ops.dlq import read_letters, reinject, select

    settings = _settings()
    chosen = select(_run(read_letters(settings)), reasons, refs, source_topic)
    report = _run(reinject(settings, chosen, into, dry_run, again))
    if as_json:
        _echo_json(report.to_dict())
        return
    verb = "would send" if dry_run else "sent"
    n = sum(report.targets.values()) if dry_run else report.sent
    click.echo(
        f"{report.selected:,} selected, {verb} {n:,}"
        f" ({', '.join(f'{t} {n:,}' for t, n in report.targets.items()) or 'none'}); "
        f"{report.skipped_already_sent:,} sent before, {report.skipped_no_original:,} without bytes"
    )


# --- forget-user -----------------------------------------------------------------------------


@click.command("forget-user")
@click.argument("user_id")
@click.option("--dry-run", is_flag=True, help="Say what would be erased; change nothing.")
@click.option(
    "--settle",
    "settle_s",
    type=float,
    help="Seconds between the two sweeps, for a batch in flight at the erase to finish "
    "writing (default streams.control.SETTLE_S, 5).",
)
@_JSON
def forget_user(user_id: str, dry_run: bool, settle_s: float | None, as_json: bool) -> None:
    """Erase a user: their state under every key prefix, and their recommendations.

    \b
    1. Adds the user's keyed hash (never the id) to the suppression list, kept
       SHOPREC_TOPIC_RETENTION_S: the worker, replay and rebuild skip the user's
       retained events up to now; later events are a new relationship, processed.
    2. Deletes every Redis key under the user's hash tag {u:ID}, in the live state
       and in every shadow prefix (replay:, rebuild:, ...), then again after --settle.
    3. Publishes a tombstone (key ID, null value) on recs.out.
    The same happens for {"type": "forget_user", "user_id": ID} on shop.control.
    \b
    Examples:
      shoprec forget-user 541312140 --dry-run
      shoprec forget-user 541312140 --json
    """
    from ops.forget import forget_user as run
    from ops.forget import format_report
    from streams.control import SETTLE_S

    settings = _settings()
    settle = SETTLE_S if settle_s is None else settle_s
    report = _run(run(settings, user_id, dry_run=dry_run, settle_s=settle))
    _echo_json(report.to_dict()) if as_json else click.echo(format_report(report))


COMMANDS = (replay, rebuild_state, inspect, dlq, forget_user)
