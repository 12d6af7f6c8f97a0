"""``shoprec experiment simulate``: an experiment's arms on a real dataset, offline, before
any shopper sees them.

The dataset's events are replayed in event order through the worker's own code: the
ingest path (validation, dedupe, rate limit, one trigger per user per micro-batch) into
the in-memory feature store (``features.fold.MemoryStore``, the live store's twin), the
recommend request the worker builds, and ``ranking.pipeline.recommend`` with each arm's
scorer in this process: the trained ranker of the model repository (what Triton's
``fused_ranker`` scores with), co-visitation order, or retrieval order.  Attribution is
the live rule (``features.attribution.MemoryAttribution``, held equal to the Lua by a
test): a list is credited with the user's later logged clicks, carts and purchases of its
items within the window.

Two modes:

* **estimate** (default): every arm scores every trigger, as shadows of a replay that
  shows nothing; each arm's lists are credited independently.  The report gives each
  arm's CTR@K, add-to-cart and purchase rates per list, and the difference to the control
  **paired by user** (the same users, the same triggers: narrow intervals).
* **bandit** (``--bandit``): the experiment's bandit assigns users as it would live
  (Thompson sampling, periods of event time), each user sees their arm's lists only, and
  the report shows the allocation moving.

What it estimates: for each arm, the share of its lists (one per trigger) for which the
same user's logged click (or ``click_types`` event), cart or purchase of one of its items
came within ``(list time, list time + window]``: a hit rate, each event credited at most
once per arm, to the newest such list.

Its bias (docs/experiments.md, "the estimator and its bias", with measurements): this is
the replay estimator on logs the shop's own pages produced, not on a randomised logging
policy, so it is not the unbiased rejection-sampling replay of Li et al. (which needs
logged actions chosen uniformly at random), and no propensities exist to reweight by: the
logged shoppers never saw these lists.  A list is credited when it *predicted* what the
shopper did next anyway, which favours arms that resemble what the shop showed (popular,
co-visited items) and lists of items the shopper already looked at (a re-view counts),
and credits nothing the shopper would only have done because of the list; items the shop
never displayed can hardly be credited.  A ranker trained on the same events is scored
in-sample unless ``score_from_ms`` starts the lists after its training period.  Read it
as a ranking of arms on hit rate, to stop an obviously worse arm before it goes live,
never as a forecast of live CTR or of uplift over a holdout.  What the offline store does
not model: behavioural vectors of items without text (they are not retrieved here), key
TTLs, and search queries (not embedded: no Triton).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import orjson

from features.ann import TableIndex
from features.attribution import AttributionPolicy, MemoryAttribution, ShownList
from features.fold import MemoryStore
from features.item_table import ItemTable
from features.store import UpdatePolicy, UpdateResult, UserUpdate
from features.user_state import Vector
from ops.experiment import Report, build_report
from ops.produce import dataset_files, in_event_order, read_jsonl
from ranking.data import embed_catalogue, load_catalogue, time_cuts
from ranking.fusion import FusionScorer
from ranking.pipeline import FallbackScorer, RecommendRequest, Scorer, TopK, recommend
from shoprec.errors import ConfigError, DatasetError
from shoprec.experiments import Arm, Experiment
from shoprec.settings import CACHE_DIR, Settings
from streams.bandit import Allocation
from streams.experiment import CovisitationScorer, ExperimentRunner, rank_by_arm, shown_lists
from streams.ingest import Ingestor, RawRecord
from streams.metrics import WorkerStats
from streams.recommend import RecommendPolicy, build_request
from streams.runtime import limits_from

log = logging.getLogger("shoprec.simulate")
Bools = npt.NDArray[np.bool_]

REPLAY_ARM = "replay"
"""The one live arm of an estimate: everyone, shown nothing; the compared arms are its
shadows."""

DEFAULT_ARMS = (
    Arm(name="ranker", kind="ranker", share=0.5),
    Arm(name="covisitation", kind="covisitation", share=0.5),
)


@dataclass(frozen=True)
class SimulateOptions:
    data: Path
    experiment: Experiment
    model_repo: Path
    cache: Path | None = CACHE_DIR
    bandit: bool = False
    limit: int | None = None
    batch: int = 128
    score_from_ms: int | None = None
    """Make (and so credit) lists only for triggers at or after this event time; the
    events before it only build the state: to estimate on events a trained ranker did
    not learn from (its validation and test periods) with a warm store."""


def default_experiment(bandit: bool, every_s: float = 600.0) -> Experiment:
    """The comparison the issue asks for: the served ranker against co-visitation order
    (with a bandit: reward a click, keep 10% each, a new allocation every ``every_s`` of
    event time)."""
    doc: dict[str, object] = {
        "name": "simulated",
        "arms": [a.model_dump() for a in DEFAULT_ARMS],
        "click_types": ["click", "view"],
    }
    if bandit:
        doc["bandit"] = {"reward": "click", "min_share": 0.1, "every_s": every_s}
    return Experiment.model_validate(doc)


def as_estimate(experiment: Experiment) -> Experiment:
    """Every arm that scores, as a shadow of one live arm that shows nothing to anyone."""
    arms = [Arm(name=REPLAY_ARM, kind="holdout", share=1.0)] + [
        a.model_copy(update={"shadow": True, "share": 0.0})
        for a in experiment.arms
        if a.kind != "holdout"
    ]
    return Experiment.model_validate(
        {
            **experiment.model_dump(),
            "arms": [a.model_dump() for a in arms],
            "control": REPLAY_ARM,
            "bandit": None,
        }
    )


def compared_control(experiment: Experiment) -> str:
    """The arm an estimate compares the others with: the experiment's control when it
    scores, else its first arm that does."""
    control = experiment.arm(experiment.control_arm)
    if control.kind != "holdout":
        return control.name
    return next(a.name for a in experiment.arms if a.kind != "holdout")


def offline_scorer(model_repo: Path, arm: Arm) -> Scorer:
    """What scores ``arm`` in this process: the ranker version's own scorer (the trained
    ranker of a version folder with ``ranker.json``, v1's fixed fusion otherwise), or the
    worker's co-visitation or retrieval order."""
    if arm.kind == "covisitation":
        return CovisitationScorer()
    if arm.kind == "retrieval":
        return FallbackScorer()
    if arm.kind != "ranker":
        raise ConfigError(f"arm {arm.name!r} ({arm.kind}) does not score")
    root = model_repo / "fused_ranker"
    versions = sorted((int(p.name) for p in root.glob("[0-9]*") if p.is_dir()), reverse=True)
    if not versions:
        raise ConfigError(f"no fused_ranker version in {root} (SHOPREC_MODEL_REPO)")
    version = int(arm.model_version) if arm.model_version else versions[0]
    folder = root / str(version)
    if not folder.is_dir():
        raise ConfigError(f"arm {arm.name!r}: no version {version} in {root}")
    if (folder / "ranker.json").is_file():
        import torch

        from ranking.serve import LearnedRanker

        # Small batches of small ops: one thread, as Triton's fused_ranker runs it on a
        # CPU (measured here: 237 ms a call with torch's default threads on a loaded
        # 2-core machine, the whole simulation's time).
        torch.set_num_threads(1)
        return LearnedRanker(folder)
    return FusionScorer()


def held_out_from(data: Path, period: str) -> int:
    """The event time at which the trainer's ``"valid"`` or ``"test"`` period of ``data``
    starts (``ranking.data.time_cuts`` with the trainer's defaults: the last 20% and 10%
    of the events), so an estimate can leave out what a ranker trained on there learned."""
    ts = np.fromiter((int(e["ts"]) for e in read_jsonl(dataset_files(data)[1])), np.int64)
    if ts.size == 0:
        raise DatasetError(f"{data} holds no events")
    ts.sort()
    valid, test = time_cuts(ts, 0.1, 0.1)
    if period not in ("valid", "test"):
        raise ConfigError(f"held-out period {period!r}: valid or test")
    return valid if period == "valid" else test


class _Folding:
    """The in-memory store behind the write path the ingest code calls."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def apply_events(self, updates: Sequence[UserUpdate]) -> list[UpdateResult]:
        return self.store.apply_events(updates)


class _Vectors:
    """The text embedding of each item: what the ingest path folds into a user."""

    def __init__(self, emb: npt.NDArray[np.float32], has_text: Bools, ids: list[str]) -> None:
        self._row = {i: r for r, i in enumerate(ids)}
        self._emb, self._has = emb, has_text

    def vector(self, item_id: str) -> Vector | None:
        r = self._row.get(item_id)
        return None if r is None or not self._has[r] else self._emb[r]


class _NoQueries:
    async def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        raise DatasetError("search events need Triton's query encoder; not simulated")


ShownLists = Mapping[str, Sequence[ShownList]]


async def simulate(
    settings: Settings,
    opts: SimulateOptions,
    progress: Callable[[int], None] | None = None,
    on_show: Callable[[ShownLists], None] | None = None,
) -> Report:
    """Replay ``opts.data`` through the arms of ``opts.experiment`` (see the module docstring).

    ``progress`` is called with the number of events replayed so far (every 1,000, and at
    the end); ``on_show`` with each micro-batch's lists, per user, as attribution is given
    them (a test counts the credit on its own from these and the events)."""
    events_path = dataset_files(opts.data)[1]
    if settings.attribution_window_ms <= 0:
        raise ConfigError(
            "SHOPREC_ATTRIBUTION_WINDOW_MS is 0: no list could be credited; set a window "
            "(the default is 1800000, 30 minutes)"
        )
    if not any(a.kind != "holdout" for a in opts.experiment.arms):
        raise ConfigError(f"experiment {opts.experiment.name!r} has no arm that makes lists")
    experiment = opts.experiment if opts.bandit else as_estimate(opts.experiment)
    if opts.bandit and experiment.bandit is None:
        raise ConfigError(f"experiment {experiment.name!r} has no bandit to simulate")
    catalogue = load_catalogue(opts.data)
    emb = embed_catalogue(catalogue, opts.cache)
    table = ItemTable()
    table.upsert(catalogue.ids, emb, has_emb=catalogue.has_text)
    index = TableIndex(table)
    scorers = {
        a.name: offline_scorer(opts.model_repo, a) for a in experiment.arms if a.kind != "holdout"
    }
    changed = table.take_changed()
    index.changed(changed)
    for scorer in scorers.values():
        scorer.sync(table, changed)
    store = MemoryStore(UpdatePolicy.of(settings), category_of=catalogue.category.get)
    attribution = MemoryAttribution(
        AttributionPolicy(
            experiment.name,
            tuple(a.name for a in experiment.live_arms),
            settings.attribution_window_ms,
            settings.user_ttl_s,
        )
    )
    now = [0.0]
    runner = ExperimentRunner(experiment, attribution, WorkerStats(), clock_s=lambda: now[0])
    ingestor = Ingestor(
        _Folding(store),
        _Vectors(emb, catalogue.has_text, catalogue.ids),
        _NoQueries(),
        limits_from(settings),
        lambda: int(now[0] * 1000),
        experiment=runner,
    )
    policy = RecommendPolicy.from_settings(settings)
    request_policy = policy.carrying(experiment)

    async def rank(request: RecommendRequest, arm: Arm) -> tuple[TopK, str, bool]:
        return recommend(request, table, index, scorers[arm.name]), arm.label, False

    sent = 0
    made_lists = [0]
    batch: list[RawRecord] = []

    async def run(records: list[RawRecord]) -> None:
        outcome = await ingestor.ingest(records)
        triggers = outcome.triggers
        if opts.score_from_ms is not None:
            triggers = [t for t in triggers if t.ts >= opts.score_from_ms]
        if not triggers:
            return
        ctx = store.read_context([t.user_id for t in triggers], {t.user_id: t.ts for t in triggers})
        users = [ctx.users[t.user_id] for t in triggers]
        request = build_request(triggers, users, ctx.trending, table, request_policy)
        arms = [runner.arm(outcome.arms[t.user_id]) for t in triggers]
        answers = await rank_by_arm(request, arms, runner.shadows, rank, policy.complements)
        made = [(a, table.id_of(a.top.items)) for a in answers]
        shown = shown_lists(triggers, made, experiment.name)
        made_lists[0] += sum(map(len, shown.values()))
        if on_show is not None:
            on_show(shown)
        await runner.show(shown)

    batch_ts = 0
    for n, event in enumerate(in_event_order(read_jsonl(events_path))):
        if opts.limit is not None and n >= opts.limit:
            break
        # A micro-batch is one timestamp's events (as the live worker, keeping up, takes
        # what arrives together), at most opts.batch: a list is credited only with events
        # of later batches, so batches spanning seconds of shop time would lose credit.
        if batch and (event["ts"] != batch_ts or len(batch) >= opts.batch):
            await run(batch)
            if progress is not None and (sent + len(batch)) // 1000 > sent // 1000:
                progress(sent + len(batch))
            sent += len(batch)
            batch = []
        batch_ts = event["ts"]
        # The clock stands at the event time: the future-time guard and the bandit's
        # periods follow the replayed history, not the machine's clock.
        now[0] = max(now[0], event["ts"] / 1000.0)
        batch.append(RawRecord("replay", 0, n, str(event["user_id"]).encode(), orjson.dumps(event)))
    if batch:
        await run(batch)
        sent += len(batch)
    if progress is not None:
        progress(sent)
    if sent == 0:
        raise DatasetError(f"{events_path} holds no events")
    if opts.score_from_ms is not None and not made_lists[0]:
        raise DatasetError(
            f"no list was made at or after the score-from time {opts.score_from_ms} (ms) in "
            f"the {sent} events replayed: is it past the last of them (--limit)?"
        )
    return build_report(
        experiment,
        (rec for _, rec in attribution.records()),
        k=settings.top_k,
        window_ms=settings.attribution_window_ms,
        allocations=[Allocation.from_json(a) for _, a in sorted(attribution.allocations.items())],
        control=None if opts.bandit else compared_control(opts.experiment),
    )
