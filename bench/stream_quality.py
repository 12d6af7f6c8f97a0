"""A shop's stream through the stack while the learner runs: ``python -m bench.stream_quality``.

Issue 13's stream measurement, on every dataset.  Per shop, as the shop would run it: a
private stack (Apache Kafka, Redis, Triton serving a private copy of ``model_repo``, so
the shipped ``fused_ranker@2`` is live at the start) and ``shoprec worker`` with
``SHOPREC_MIN_EMIT_INTERVAL_MS=0`` (every event gets a list);

1. the catalogue and the first 70% of the events are sent (``shoprec produce --keep-ts``,
   the recorded event times) and the worker takes them all;
2. ``shoprec learner`` starts and runs a round: it reads the topics back, trains the
   shop's own candidate, judges it against the live version on the latest events held out
   by time, and promotes it through Triton's model control only if it is better
   (``ops.learn.decide``);
3. the last 30% are sent paced (``--rate``, 40 events/s by default: each event meets the
   list its user had just before it) in ``--rounds`` equal segments (3: 10% each).  After
   each segment but the last the learner counts a segment's new events
   (``SHOPREC_LEARNER_EVERY_EVENTS``) and runs its next round, and the stream waits for
   it: in a shop a segment is days of events, a round a minute or two.  Every
   ``recs.out`` message is read back;
4. :func:`stream_ndcg` scores them test-then-learn: an event counts when its item differs
   from the user's previous one; its rank in the user's latest list from this part of the
   stream, against its rank in the co-visitation list computed from the same stream up to
   that event.  NDCG@10, 95% bootstrap intervals over users, the difference paired.

``--max-events`` takes a shop's first events only (in the order ``produce`` sends them):
UCI's 396,337 events would take over three hours at the paced rate on two cores.

    python -m bench.stream_quality --max-events 40000 --json bench/results/stream-quality.json

``tests/integration/test_learner.py`` runs the same scenario (:func:`learning_stream`, one
round) on amazon-gift-cards-2018 and then tests promotion, rejection and rollback on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gzip
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import orjson

from bench.e2e import Started, bench_stack, events_counted, start_process, start_workers
from bench.report import (
    REPO_ROOT,
    bar,
    bars_with_intervals,
    data_option,
    datasets,
    json_option,
    publish,
    say,
    shoprec,
)
from features.candidates import JUST_PURCHASED_MS
from features.fold import MemoryStore
from features.store import ALWAYS_EMIT, UserUpdate
from infra import procs
from ops.produce import in_event_order, wait_for_catalog
from ops.simulate import ShownLists, SimulateOptions, simulate
from ops.versions import Versions
from ranking.data import POLICY as DEFAULT_POLICY
from ranking.evaluate import Metrics, paired_difference
from shoprec.errors import ConfigError
from shoprec.experiments import Experiment, list_id
from shoprec.settings import CACHE_DIR, Settings

FIRST = 0.7
"""Share of a shop's events sent before the learner's round; the rest is measured."""
K = 10
RATE = 40.0
ROUNDS = 3
"""Learner rounds by default: at 70%, 80% and 90% of the events."""


# --- the shop's events, split ---------------------------------------------------------


@dataclass(frozen=True)
class Shop:
    """A shop's events in the order ``produce`` sends them, split into dataset folders (the
    first ``FIRST`` share, then the rest in equal segments), each with the catalogue
    records of every item the events touch."""

    name: str
    parts: tuple[Path, ...]
    sizes: tuple[int, ...]
    """Events in each of ``parts``."""
    events: list[dict[str, Any]]
    n_items: int
    n_first: int

    @property
    def first(self) -> Path:
        return self.parts[0]

    @property
    def segments(self) -> tuple[Path, ...]:
        """The measured rest, one folder per learner round."""
        return self.parts[1:]


def split_shop(src: Path, work: Path, max_events: int | None = None, segments: int = 1) -> Shop:
    """:class:`Shop` of dataset folder ``src`` (its first ``max_events`` only, if given),
    the rest in ``segments`` parts."""
    with gzip.open(src / "events.jsonl.gz", "rb") as fh:
        lines = (
            fh
            if max_events is None
            else (line for _, line in zip(range(max_events), fh, strict=False))
        )
        events = list(in_event_order(orjson.loads(line) for line in lines))
    wanted = {e["item_id"] for e in events}
    with gzip.open(src / "items.jsonl.gz", "rb") as fh:
        items = [i for line in fh if (i := orjson.loads(line))["item_id"] in wanted]
    cut = int(len(events) * FIRST)
    ends = [cut + (len(events) - cut) * (k + 1) // segments for k in range(segments)]
    parts, sizes = [], []
    for k, (lo, hi) in enumerate(zip([0, cut, *ends], [cut, *ends], strict=False)):
        folder = work / ("first" if k == 0 else f"segment-{k}")
        folder.mkdir(parents=True)
        _write(folder / "events.jsonl.gz", events[lo:hi])
        _write(folder / "items.jsonl.gz", items)
        parts.append(folder)
        sizes.append(hi - lo)
    return Shop(src.name, tuple(parts), tuple(sizes), events, len(items), cut)


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    with gzip.open(path, "wb") as fh:
        fh.writelines(orjson.dumps(r) + b"\n" for r in rows)


# --- the scenario on a running stack ------------------------------------------------


@dataclass
class Streamed:
    """What one run of the scenario left: every ``recs.out`` message, the learner's log
    and its metrics after its round."""

    recs: list[dict[str, Any]]
    learner_log: str
    learner_metrics: dict[str, float]
    seconds: dict[str, float]


@contextlib.contextmanager
def learning_stream(
    settings: Settings, shop: Shop, logs: Path, rate: float = RATE
) -> Iterator[Streamed]:
    """Steps 1-3 of the module's scenario on the stack ``settings`` point at (its
    ``model_repo`` the one Triton serves, ``min_emit_interval_ms`` 0), a learner round
    before each of ``shop.segments``; the worker and the learner are stopped when the block
    ends, the stack is the caller's."""
    sizes = shop.sizes[1:]
    settings = settings.model_copy(
        update={
            "learner_every_s": 86_400.0,  # the first round at start, the others by events:
            # after each segment but the last, the learner counts a segment's new events.
            "learner_every_events": min(sizes[:-1], default=0),
            "learner_min_events": 100,
        }
    )
    env = settings.as_env()
    logs.mkdir(parents=True, exist_ok=True)
    took: dict[str, float] = {}
    t0 = time.perf_counter()
    [worker] = start_workers(settings, 1, logs)
    learner: procs.Proc | None = None
    try:
        shoprec(env, "catalog", "load", "--data", str(shop.first))
        alive = functools.partial(procs.is_alive, worker.proc)
        asyncio.run(wait_for_catalog(settings, shop.n_items, 1200, alive))
        shoprec(env, "produce", "--data", str(shop.first), "--no-catalog", "--keep-ts")
        _wait_events(worker, shop.n_first)
        took["first_part"] = time.perf_counter() - t0

        port = procs.free_port()
        url = f"http://{settings.metrics_host}:{port}/metrics"
        argv = [sys.executable, "-m", "cli.main", "learner"]
        started = start_process(
            "learner", argv, logs / "learner.log", env | {"SHOPREC_METRICS_PORT": str(port)}
        )
        learner = started.proc
        metrics: dict[str, float] = {}
        sent = shop.n_first
        for k, (part, size) in enumerate(zip(shop.segments, sizes, strict=True)):
            # The stream waits for the round: a segment is days of a shop's events, a
            # round a minute or two.
            began = time.perf_counter()
            metrics = _wait_round(learner, url, k + 1)
            took["learner_rounds"] = took.get("learner_rounds", 0.0) + time.perf_counter() - began
            segment = ("--data", str(part), "--no-catalog", "--keep-ts", "--rate", str(rate))
            shoprec(env, "produce", *segment)
            sent += size
            _wait_events(worker, sent)
        tail = shoprec(env, "recs", "tail", "--from-beginning", "--json", "--timeout", "20")
        took["total"] = time.perf_counter() - t0
        log = learner.log_path.read_text(errors="replace")[started.log_offset :]
        yield Streamed([orjson.loads(line) for line in tail.splitlines()], log, metrics, took)
    finally:
        if learner is not None:
            procs.stop(learner)
        procs.stop(worker.proc)


def _wait_events(worker: Started, n: int, timeout_s: float = 3600.0) -> None:
    procs.wait_until(
        lambda: events_counted(worker) >= n,
        timeout_s,
        f"the worker to take {n} events",
        proc=worker.proc,
    )


def _wait_round(
    learner: procs.Proc, url: str, n: int = 1, timeout_s: float = 3600.0
) -> dict[str, float]:
    """The learner's metrics once ``n`` rounds have an outcome."""
    got: dict[str, float] = {}

    def done() -> bool:
        nonlocal got
        try:
            got = learner_metrics(url)
        except OSError:
            return False
        return sum(v for k, v in got.items() if k.startswith("rounds_")) >= n

    procs.wait_until(done, timeout_s, f"the learner's round {n}", proc=learner)
    return got


def learner_metrics(url: str) -> dict[str, float]:
    """The learner's Prometheus samples, ``shoprec_learner_`` dropped, rounds by outcome
    as ``rounds_<outcome>``."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name = s.name.removeprefix("shoprec_learner_")
            if "outcome" in s.labels:
                name = f"rounds_{s.labels['outcome']}"
            out[name] = s.value
    return out


# --- the measurement: recs.out against co-visitation, test-then-learn ---------------------


POLICY = dataclasses.replace(DEFAULT_POLICY, min_emit_interval_ms=0)
"""The worker's defaults as this benchmark runs it, for the co-visitation list computed
beside it."""


def stream_ndcg(
    events: list[dict[str, Any]], recs: list[dict[str, Any]], start: int
) -> tuple[dict[str, Any], Metrics, Metrics]:
    """The issue's stream measurement over ``events[start:]``, test-then-learn.

    An event counts when its item differs from the user's previous one and the user already
    has a list on ``recs.out`` from this part of the stream (a trigger at or after
    ``start``).  Its rank in that latest list (``degraded_lists`` counts the lists the
    worker ranked without Triton), and in the co-visitation list of the user's
    latest items computed from the same stream up to it (the in-memory feature store, 20
    neighbours per item, the worker's filter: not the item in view, not what the user
    bought within a day).  Ranks past 10 count as misses.
    """
    by_trigger = {r["trigger"]["event_id"]: r for r in recs}
    store = MemoryStore(POLICY)
    latest_list: dict[str, list[str]] = {}
    latest_model: dict[str, str] = {}
    latest_degraded: dict[str, bool] = {}
    previous: dict[str, str] = {}
    ours, covisitation = Metrics(), Metrics()
    # The same two measures split by the version whose list was scored: where versions
    # differ (one takes complements, the next none), the total hides which one cost.
    by_model: dict[str, tuple[Metrics, Metrics]] = {}
    degraded = 0
    users: dict[str, int] = {}
    for k, e in enumerate(events):
        user, item = str(e["user_id"]), str(e["item_id"])
        if user in latest_list and previous.get(user, item) != item:
            u = users.setdefault(user, len(users))
            rank = _rank(latest_list[user], item)
            ours.add(rank, u)
            split = by_model.setdefault(latest_model[user], (Metrics(), Metrics()))
            split[0].add(rank, u)
            degraded += latest_degraded[user]
            ctx = store.read_context([user], {user: int(e["ts"])}).users[user]
            hidden = blocked_items(ctx, previous[user])
            covis = sorted(
                (i for i in ctx.covis if i not in hidden), key=lambda i: (-ctx.covis[i], i)
            )
            covis_rank = _rank(covis, item)
            covisitation.add(covis_rank, u)
            split[1].add(covis_rank, u)
        store.apply_events([_update(e)])
        previous[user] = item
        rec = by_trigger.get(e["event_id"])
        if rec is not None and k >= start:
            latest_list[user] = [x["item_id"] for x in rec["items"]]
            latest_model[user] = rec["model"]
            latest_degraded[user] = bool(rec.get("degraded"))
    ours.finish()
    covisitation.finish()
    gain = paired_difference(ours, covisitation) if ours.n else None
    summary: dict[str, Any] = {
        "events_scored": ours.n,
        "users": len(users),
        "lists_by_model": {m: len(pair[0].ranks) for m, pair in by_model.items()},
        "by_model": {m: _versus(*pair) for m, pair in sorted(by_model.items())},
        "degraded_lists": degraded,
        "shoprec_ndcg@10": ours.to_json(),
        "covisitation_ndcg@10": covisitation.to_json(),
        "shoprec_minus_covisitation": gain.to_json() if gain else None,
        "relative": round(gain.value / covisitation.ndcg, 4)
        if gain and covisitation.ndcg
        else None,
    }
    return summary, ours, covisitation


def _versus(ours: Metrics, covisitation: Metrics) -> dict[str, Any]:
    """One version's lists against co-visitation on the same events."""
    ours.finish()
    covisitation.finish()
    return {
        "events_scored": ours.n,
        "shoprec_ndcg@10": round(ours.ndcg, 4),
        "covisitation_ndcg@10": round(covisitation.ndcg, 4),
        "relative": round(ours.ndcg / covisitation.ndcg - 1, 4) if covisitation.ndcg else None,
    }


def _update(e: dict[str, Any]) -> UserUpdate:
    return UserUpdate(
        e["event_id"],
        str(e["user_id"]),
        e["type"],
        int(e["ts"]),
        str(e["item_id"]),
        None,
        e["type"] in ALWAYS_EMIT,
    )


def blocked_items(ctx: Any, in_view: str) -> set[str]:
    """The worker's filter: the item in view and what the user bought within a day."""
    latest = max((h.ts for h in ctx.history), default=0)
    bought = {
        h.item_id
        for h in ctx.history
        if h.type == "purchase" and latest - h.ts <= JUST_PURCHASED_MS
    }
    return bought | {in_view}


def _rank(ranked: list[str], item: str) -> float:
    top = ranked[:K]
    return float(top.index(item) + 1) if item in top else float(K + 1)


# --- the same stream, replayed offline -------------------------------------------------


def replay_offline(
    settings: Settings, shop: Shop, recs: list[dict[str, Any]], work: Path
) -> dict[str, Any]:
    """``recs.out`` against the lists the offline replay of the same events makes.

    ``ops.simulate`` (what ``shoprec experiment simulate`` runs) replays ``shop.events``
    through the worker's own ingest and recommend code, the in-memory feature store and
    each version's ranker in this process, one event per micro-batch; each trigger of the
    measured part that a ranker version scored live is compared with that version's list
    for it.  Equal lists mean the stream's quality is the replay's: what the learner, the
    evaluation and the simulator measure offline is what the shop is served (a list may
    still differ where scores tie to the last float bit: Triton's torch and this
    process's).  Also scored with :func:`stream_ndcg`, the replayed lists in place of the
    live ones."""
    folder = work / "whole"
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder / "events.jsonl.gz", shop.events)
    shutil.copyfile(shop.first / "items.jsonl.gz", folder / "items.jsonl.gz")
    measured = {e["event_id"] for e in shop.events[shop.n_first :]}
    live = [
        r
        for r in recs
        if r["trigger"]["event_id"] in measured
        and r["model"].startswith("fused_ranker@")
        and not r.get("degraded")
    ]
    versions = sorted({r["model"].removeprefix("fused_ranker@") for r in live}, key=int)
    arms: list[dict[str, Any]] = [
        {"name": f"v{v}", "kind": "ranker", "model_version": v, "shadow": True} for v in versions
    ]
    # The experiment needs one arm that is shown; retrieval order is the cheapest.
    arms.append({"name": "shown", "kind": "retrieval", "share": 1.0})
    experiment = Experiment.model_validate({"name": "replay", "arms": arms})
    trigger_of = {list_id(str(e["user_id"]), e["event_id"]): e["event_id"] for e in shop.events}
    made: dict[tuple[str, str], list[str]] = {}  # (arm, trigger) -> items

    def keep(shown: ShownLists) -> None:
        for lists in shown.values():
            for s in lists:
                made[(s.arm, trigger_of[s.list_id])] = list(s.items)

    options = SimulateOptions(
        folder, experiment, settings.model_repo, REPO_ROOT / CACHE_DIR, batch=1
    )
    asyncio.run(simulate(settings, options, on_show=keep))
    replayed, identical, overlap = [], 0, 0.0
    for r in live:
        version = r["model"].removeprefix("fused_ranker@")
        ours = made.get((f"v{version}", r["trigger"]["event_id"]), [])
        theirs = [x["item_id"] for x in r["items"]]
        identical += ours == theirs
        overlap += len(set(ours) & set(theirs)) / max(len(theirs), 1)
        replayed.append(r | {"items": [{"item_id": i} for i in ours]})
    served, _, _ = stream_ndcg(shop.events, live, shop.n_first)
    again, _, _ = stream_ndcg(shop.events, replayed, shop.n_first)
    return {
        "lists_compared": len(live),
        "identical": identical,
        "mean_overlap": round(overlap / len(live), 4) if live else None,
        "recs_out_ndcg@10": served["shoprec_ndcg@10"]["ndcg@10"],
        "replayed_ndcg@10": again["shoprec_ndcg@10"]["ndcg@10"],
        "events_scored": again["events_scored"],
    }


# --- the benchmark ----------------------------------------------------------------------


def one_shop(
    folder: Path, work: Path, rate: float, max_events: int | None, rounds: int, replay: bool
) -> dict[str, Any]:
    """The scenario on a stack of its own (a fresh Redis, the shipped model live)."""
    shop = split_shop(folder, work / "data", max_events, rounds)
    repo = work / "model_repo"
    shutil.copytree(REPO_ROOT / "model_repo", repo, ignore=shutil.ignore_patterns("__pycache__"))
    versions = Versions(repo, work / "archive")
    first_candidate = versions.next_version()
    say(f"{shop.name}: {len(shop.events)} events, {shop.n_items} items, {rounds} rounds")
    with bench_stack("kafka", repo, 0) as base:
        settings = base.model_copy(
            update={
                "model_repo": repo,
                "model_archive": work / "archive",
                # BERT on a loaded 2-core machine: a catalogue batch may take longer than 2 s.
                "triton_timeout_s": 30.0,
            }
        )
        with learning_stream(settings, shop, work / "logs", rate) as run:
            summary, _, _ = stream_ndcg(shop.events, run.recs, shop.n_first)
    if replay:
        say(f"{shop.name}: the same events replayed offline through the served code ...")
        summary["replayed_offline"] = replay_offline(settings, shop, run.recs, work)
    # Each round's candidate: promoted into the served repository, or kept in the archive
    # (a round the last segment triggered may have been stopped before its card).
    cards = []
    for version in range(first_candidate, first_candidate + rounds):
        try:
            cards.append(versions.card(version) or {})
        except ConfigError:  # no such version: the round was stopped before it wrote one
            cards.append({})
    m = run.learner_metrics
    return {
        "dataset": shop.name,
        "events": len(shop.events),
        "events_first_part": shop.n_first,
        "items": shop.n_items,
        "rate": rate,
        "learner": {
            "rounds": {
                k.removeprefix("rounds_"): v for k, v in m.items() if k.startswith("rounds_")
            },
            "live_version": m.get("live_version"),
            "each_round": [_round_of(card) for card in cards],
        },
        "seconds": {k: round(v, 1) for k, v in run.seconds.items()},
        **summary,
    }


def _round_of(card: dict[str, Any]) -> dict[str, Any]:
    """What a round's model card says of its judgement."""
    return {
        "version": card.get("version"),
        "decision": card.get("decision"),
        "held_out": card.get("held_out"),
        "held_out_next_event": card.get("held_out_next_event"),
        "versus_next_event": card.get("versus_next_event"),
        "complements": card.get("complements"),
        "kept": card.get("training", {}).get("kept"),
        "best_epoch": card.get("training", {}).get("best_epoch"),
        "cold_shop": card.get("training", {}).get("cold_shop"),
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    bars_with_intervals(
        path,
        [f"{r['dataset']}\n{r['events_scored']} events" for r in results],
        {
            "shoprec (recs.out)": [bar(r["shoprec_ndcg@10"], "ndcg@10") for r in results],
            "co-visitation": [bar(r["covisitation_ndcg@10"], "ndcg@10") for r in results],
        },
        "NDCG@10, last 30% of the stream (95% CI)",
        "Each shop's stream through the stack while the learner runs",
    )


@click.command()
@data_option
@click.option(
    "--rate",
    default=RATE,
    show_default=True,
    help="Events/s of the measured last 30% (paced, so each event meets its user's list).",
)
@click.option(
    "--max-events",
    type=click.IntRange(min=100),
    default=None,
    help="Take only each shop's first N events (default: all).",
)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=ROUNDS,
    show_default=True,
    help="Learner rounds: at 70% of the events, then after each equal segment of the rest.",
)
@click.option(
    "--replay/--no-replay",
    default=False,
    show_default=True,
    help="Also replay each shop's events offline through the served code (ops.simulate) "
    "and compare its lists with recs.out, list by list.",
)
@json_option
def main(
    folders: tuple[Path, ...],
    rate: float,
    max_events: int | None,
    rounds: int,
    replay: bool,
    json_path: Path | None,
) -> None:
    """Stream each shop's events through a private stack while ``shoprec learner`` runs, and
    score the recommendations on recs.out against co-visitation on the same stream."""
    results = []
    for folder in datasets(folders):
        with tempfile.TemporaryDirectory(prefix=f"shoprec-stream-{folder.name}-") as tmp:
            r = one_shop(folder, Path(tmp), rate, max_events, rounds, replay)
        say(
            f"{r['dataset']}: shoprec {r['shoprec_ndcg@10']['ndcg@10']} "
            f"co-visitation {r['covisitation_ndcg@10']['ndcg@10']} "
            f"relative {r['relative']} (learner rounds: {r['learner']['rounds']}, served: "
            f"{r['lists_by_model']})"
        )
        results.append(r)
    config = {"rate": rate, "max_events": max_events, "rounds": rounds, "replay": replay}
    publish("stream_quality", config, results, json_path, plot)


if __name__ == "__main__":
    main()
