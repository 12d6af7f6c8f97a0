"""``shoprec learner`` beside the worker on the real stack: a shop learns from its own stream.

One scenario on real data (the first events of a real shop and the catalogue records of
their items), on a private copy of the model repository served by a real Triton, with
Kafka, Redis and ``shoprec worker``:

1. the catalogue and the first 70% of the events are streamed (recorded event times);
   the worker recommends with the shipped version 2 (trained on another shop);
2. ``shoprec learner`` starts, reads the retained topics, trains a candidate, judges it on
   the latest events held out by time against the live version, and promotes it through
   Triton's model control: Triton serves version 3 without a restart;
3. the last 30% are streamed; the worker's recommendations carry ``fused_ranker@3``, and
   they are scored test-then-learn on ``recs.out`` against co-visitation computed from the
   same stream (the issue's stream measurement, on a small scale);
4. a worse candidate (random weights) is judged on the topics and rejected: version 3
   stays live; ``shoprec model rollback`` then serves version 2 again, without a restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import torch

from features.candidates import JUST_PURCHASED_MS
from features.fold import MemoryStore
from features.store import ALWAYS_EMIT, UpdatePolicy, UserUpdate
from infra import procs
from infra.stack import Endpoints, Stack
from ops.produce import in_event_order, wait_for_catalog
from ops.versions import served_version, triton_endpoints
from ranking import export
from ranking.evaluate import Metrics, paired_difference
from ranking.model import FusedRanker
from shoprec.settings import Settings
from tests.integration.helpers import copy_model_repo, isolated_settings, run_cli
from tests.stack import stack_settings
from tests.worker import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
SHOP = "amazon-gift-cards-2018"
N_EVENTS = 2969
FIRST = 0.7
K = 10
RATE = 40  # events/s of the last 30%


@dataclass
class Scenario:
    settings: Settings
    env: dict[str, str]
    stack: Stack
    triton_pid: object
    learner_log: str
    learner_metrics: dict[str, float]
    recs: list[dict[str, Any]]
    stream: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_model_repo(tmp_path_factory.mktemp("learner-repo"))


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Shop:
    """The shop's first N_EVENTS real events in two dataset folders (the first 70%, with the
    catalogue records of every item touched, and the rest), in the order produce sends."""
    src = DATA / SHOP
    with gzip.open(src / "events.jsonl.gz", "rb") as fh:
        events = [orjson.loads(line) for _, line in zip(range(N_EVENTS), fh, strict=False)]
    events = list(in_event_order(events))
    wanted = {e["item_id"] for e in events}
    with gzip.open(src / "items.jsonl.gz", "rb") as fh:
        items = [i for line in fh if (i := orjson.loads(line))["item_id"] in wanted]
    cut = int(len(events) * FIRST)
    base = tmp_path_factory.mktemp("shop")
    first, rest = base / "first", base / "rest"
    for folder, part in ((first, events[:cut]), (rest, events[cut:])):
        folder.mkdir()
        _write(folder / "events.jsonl.gz", part)
        _write(folder / "items.jsonl.gz", items)
    return Shop(first, rest, events, len(items), cut)


@dataclass(frozen=True)
class Shop:
    first: Path
    rest: Path
    events: list[dict[str, Any]]
    n_items: int
    n_first: int


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    with gzip.open(path, "wb") as fh:
        fh.writelines(orjson.dumps(r) + b"\n" for r in rows)


@pytest.fixture(scope="module")
def scenario(
    tmp_path_factory: pytest.TempPathFactory,
    repo_copy: Path,
    shop: Shop,
) -> Iterator[Scenario]:
    work = tmp_path_factory.mktemp("learner")
    stack = Stack(stack_settings(work / "stack"), model_repo=repo_copy)
    endpoints: Endpoints = stack.up(("broker", "redis", "triton"), timeout_s=300)
    first, rest, events = shop.first, shop.rest, shop.events
    settings = isolated_settings(
        endpoints,
        min_emit_interval_ms=0,
        # BERT on a loaded 2-core machine: a catalogue batch may take longer than 2 s.
        triton_timeout_s=30.0,
        model_repo=repo_copy,
        model_archive=work / "archive",
        learner_every_s=86_400,  # one round, at start
        learner_every_events=0,
        learner_min_events=100,
    )
    env = {**os.environ, **settings.as_env()}
    worker = WorkerProcess(settings, work / "worker.log")
    learner: subprocess.Popen[bytes] | None = None
    try:
        asyncio.run(worker.ready())
        pid = stack.status()["triton"]["pid"]
        _ok(_shoprec(env, "catalog", "load", "--data", str(first)))
        alive = lambda: worker.proc.poll() is None  # noqa: E731
        asyncio.run(wait_for_catalog(settings, shop.n_items, 600, alive))
        _ok(_shoprec(env, "produce", "--data", str(first), "--no-catalog", "--keep-ts"))
        _wait_events(worker, shop.n_first)

        metrics_port = procs.free_port()
        learner_env = env | {"SHOPREC_METRICS_PORT": str(metrics_port)}
        log_path = work / "learner.log"
        with log_path.open("wb") as log:
            learner = subprocess.Popen(
                [sys.executable, "-m", "cli.main", "learner"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=learner_env,
                cwd=work,
                start_new_session=True,
            )
        url = f"http://{settings.metrics_host}:{metrics_port}/metrics"
        learner_metrics = _wait_round(learner, url, log_path)

        # Paced, so each event meets the list the user had just before it (as fast as the
        # broker takes them, one user's events share a micro-batch and are coalesced).
        rest_args = ("--data", str(rest), "--no-catalog", "--keep-ts", "--rate", str(RATE))
        _ok(_shoprec(env, "produce", *rest_args))
        _wait_events(worker, len(events))
        tail = _shoprec(env, "recs", "tail", "--from-beginning", "--json", "--timeout", "20")
        _ok(tail)
        recs = [orjson.loads(line) for line in tail.stdout.splitlines()]
        yield Scenario(
            settings,
            env,
            stack,
            pid,
            log_path.read_text(errors="replace"),
            learner_metrics,
            recs,
        )
    finally:
        if learner is not None and learner.poll() is None:
            learner.send_signal(signal.SIGTERM)
            try:
                learner.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(learner.pid, signal.SIGKILL)
                learner.wait(30)
        worker.close()
        stack.down(wipe=True)


def _shoprec(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(env, *args, timeout=900)


def _ok(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, f"{done.args}: {done.stderr[-3000:]}"


def _wait_events(worker: WorkerProcess, n: int, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while worker.counters()["events_in"] < n:
        assert worker.proc.poll() is None, worker.tail()
        assert time.monotonic() < deadline, f"worker took < {n} events:\n{worker.tail()}"
        time.sleep(1.0)


def _wait_round(learner: subprocess.Popen[bytes], url: str, log: Path) -> dict[str, float]:
    """The learner's metrics once its first round has an outcome."""
    deadline = time.monotonic() + 1200
    while True:
        assert learner.poll() is None, log.read_text(errors="replace")[-5000:]
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-5000:]
        try:
            metrics = _learner_metrics(url)
        except OSError:
            metrics = {}
        done = sum(v for k, v in metrics.items() if k.startswith("rounds_"))
        if done:
            return metrics
        time.sleep(2.0)


def _learner_metrics(url: str) -> dict[str, float]:
    import urllib.request

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


# --- the stream measurement: recs.out against co-visitation, test-then-learn ----------------


def stream_ndcg(
    events: list[dict[str, Any]], recs: list[dict[str, Any]], start: int
) -> tuple[dict[str, Any], Metrics, Metrics]:
    """The issue's stream measurement over ``events[start:]``, test-then-learn.

    An event counts when its item differs from the user's previous one and the user already
    has a list on ``recs.out`` from this part of the stream (a trigger at or after
    ``start``).  Its rank in that latest list, and in the co-visitation list of the user's
    latest items computed from the same stream up to it (the in-memory feature store, 20
    neighbours per item, the worker's filter: not the item in view, not what the user
    bought within a day).  Ranks past 10 count as misses.
    """
    by_trigger = {r["trigger"]["event_id"]: r for r in recs}
    store = MemoryStore(POLICY)
    latest_list: dict[str, list[str]] = {}
    latest_model: dict[str, str] = {}
    previous: dict[str, str] = {}
    shoprec, covisitation = Metrics(), Metrics()
    models: dict[str, int] = {}
    users: dict[str, int] = {}
    for k, e in enumerate(events):
        user, item = str(e["user_id"]), str(e["item_id"])
        if user in latest_list and previous.get(user, item) != item:
            u = users.setdefault(user, len(users))
            shoprec.add(_rank(latest_list[user], item), u)
            models[latest_model[user]] = models.get(latest_model[user], 0) + 1
            ctx = store.read_context([user], {user: int(e["ts"])}).users[user]
            hidden = blocked_items(ctx, previous[user])
            covis = sorted(
                (i for i in ctx.covis if i not in hidden), key=lambda i: (-ctx.covis[i], i)
            )
            covisitation.add(_rank(covis, item), u)
        store.apply_events([_update(e)])
        previous[user] = item
        rec = by_trigger.get(e["event_id"])
        if rec is not None and k >= start:
            latest_list[user] = [x["item_id"] for x in rec["items"]]
            latest_model[user] = rec["model"]
    shoprec.finish()
    covisitation.finish()
    gain = paired_difference(shoprec, covisitation)
    summary: dict[str, Any] = {
        "events_scored": shoprec.n,
        "users": len(users),
        "lists_by_model": models,
        "shoprec_ndcg@10": shoprec.to_json(),
        "covisitation_ndcg@10": covisitation.to_json(),
        "shoprec_minus_covisitation": gain.to_json(),
        "relative": round(gain.value / covisitation.ndcg, 4) if covisitation.ndcg else None,
    }
    return summary, shoprec, covisitation


POLICY = UpdatePolicy(
    half_life_ms=7 * 86_400_000.0, history_len=50, ttl_s=86_400, min_emit_interval_ms=0
)


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


# --- the tests ----------------------------------------------------------------------------------


def test_the_learner_promotes_the_shops_own_model_without_restarting_triton(
    scenario: Scenario, repo_copy: Path
) -> None:
    m = scenario.learner_metrics
    assert m.get("rounds_promoted") == 1, scenario.learner_log[-4000:]
    assert m["live_version"] == 3 and m["last_promotion_timestamp_seconds"] > 0
    assert 0 < m["live_ndcg_at_10"] <= 1 and m["last_training_timestamp_seconds"] > 0
    assert (repo_copy / "fused_ranker" / "3" / "card.json").is_file()
    card = json.loads((repo_copy / "fused_ranker" / "3" / "card.json").read_text())
    assert card["decision"]["promote"] and card["shop"]["topic_prefix"]
    assert card["held_out"]["candidate"]["ndcg@10"] >= card["held_out"]["live"]["ndcg@10"]
    assert set(card["held_out"]) >= {"candidate", "live", "popularity", "covisitation"}
    assert scenario.stack.status()["triton"]["pid"] == scenario.triton_pid
    for endpoint in triton_endpoints(scenario.settings.triton_url):
        assert asyncio.run(served_version(endpoint, "fused_ranker")) == 3
    models = {r["model"] for r in scenario.recs}
    assert "fused_ranker@3" in models, models


def test_recommendations_after_the_promotion_against_covisitation_on_the_same_stream(
    scenario: Scenario, shop: Shop
) -> None:
    """The issue's stream measurement on a small scale: the last 30% of the stream."""
    events = shop.events
    got, shoprec, covisitation = stream_ndcg(events, scenario.recs, shop.n_first)
    print(f"stream measurement ({SHOP}, first {len(events)} events): {json.dumps(got)}")
    assert got["events_scored"] > 100
    assert got["lists_by_model"] == {"fused_ranker@3": got["events_scored"]}
    # Not worse than co-visitation on the same stream beyond the noise of this small sample
    # (a paired bootstrap over users); the target, +10%, is what the print reports.
    gain = paired_difference(shoprec, covisitation)
    assert gain.hi >= 0, got


def test_a_worse_candidate_is_rejected_and_rollback_serves_the_previous_version(
    scenario: Scenario, repo_copy: Path
) -> None:
    settings, env = scenario.settings, scenario.env
    live = export.load(repo_copy / "fused_ranker" / "3")
    cfg = dataclasses.replace(live.config, base=False)
    torch.manual_seed(13)
    worse = FusedRanker(cfg)
    for p in worse.parameters():  # random weights: far worse than the live model
        torch.nn.init.normal_(p, std=0.5)
    candidate = settings.model_archive / "fused_ranker" / "4"
    export.save(candidate, worse, cfg, live.item_ids, {"dataset": "forced worse"})
    judged = _shoprec(env, "model", "promote", "4")
    assert judged.returncode != 0 and "worse than the live version" in judged.stderr, judged.stderr
    assert (candidate / "card.json").is_file() and not (repo_copy / "fused_ranker" / "4").exists()
    for endpoint in triton_endpoints(settings.triton_url):
        assert asyncio.run(served_version(endpoint, "fused_ranker")) == 3
    back = _shoprec(env, "model", "rollback")
    _ok(back)
    assert "version 2 is live" in back.stdout
    for endpoint in triton_endpoints(settings.triton_url):
        assert asyncio.run(served_version(endpoint, "fused_ranker")) == 2
    assert scenario.stack.status()["triton"]["pid"] == scenario.triton_pid
    listed = json.loads(_shoprec(env, "model", "list", "--json").stdout)
    assert {(v["version"], v["where"]) for v in listed["versions"]} >= {
        (2, "served"),
        (3, "archive"),
        (4, "archive"),
    }
    actions = [h["action"] for h in listed["history"]]
    assert actions[-3:] == ["promoted", "rejected", "rolled back"], actions
