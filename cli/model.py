"""The ranker's commands: ``train`` (from a dataset folder or the shop's own topics),
``evaluate``, ``learner`` (retrains and promotes continuously) and ``model`` (list, promote,
rollback the versions Triton serves)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any, cast

import click

from shoprec.settings import CACHE_DIR

DATA_HELP = (
    "Dataset folder with events.jsonl.gz and items.jsonl.gz (e.g. ../shared/data/rees46-sample)."
)
CACHE_HELP = "Where item BERT vectors are cached between runs."


def _threads(threads: int) -> None:
    import torch

    # Small ops on two shared cores: one thread measured 5-8x faster per training step.
    torch.set_num_threads(threads)


def _load(
    data: Path,
    cache: Path,
    valid_frac: float,
    test_frac: float,
    threads: int,
    order: str = "hash",
    origin: int = 0,
) -> Any:
    from ranking.data import Order, load_dataset

    _threads(threads)
    return load_dataset(
        data,
        valid_frac=valid_frac,
        test_frac=test_frac,
        cache_dir=cache,
        order=cast(Order, order),
        origin=origin,
    )


def _train_config(epochs: int, seed: int, no_text: bool) -> Any:
    from dataclasses import replace

    from ranking.train import TrainOptions

    default = TrainOptions()  # the learner's shape: one home for it
    model = replace(default.model, use_text=not no_text)
    return replace(default, model=model, max_epochs=epochs, seed=seed)


def _export(folder: Path, ds: Any, model: Any, tables: Any, report: dict[str, Any]) -> None:
    from ranking import export
    from ranking.model import RankerConfig
    from ranking.train import behavioural_ids

    cfg = RankerConfig(**report["model"])
    export.save(folder, model, cfg, behavioural_ids(ds, tables), report)
    click.echo(f"model written to {folder}", err=True)


MODELS = (
    "popularity",
    "covisitation",
    "repeat",
    "embedding",
    "sasrec",
    "fused",
    "fused_no_text",
)

_data_option = click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help=DATA_HELP,
)
_cache_option = click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    default=CACHE_DIR,
    show_default=True,
    help=CACHE_HELP,
)
_split_options = [
    click.option(
        "--threads",
        default=1,
        show_default=True,
        help="CPU threads for torch; one is fastest on a small shared CPU.",
    ),
    click.option(
        "--valid-frac",
        default=0.1,
        show_default=True,
        help="Share of events (by time) in the validation period.",
    ),
    click.option(
        "--test-frac",
        default=0.1,
        show_default=True,
        help="Share of events (by time) in the test period, the last.",
    ),
]


def _with_split(f: Any) -> Any:
    for opt in reversed(_split_options):
        f = opt(f)
    return f


@click.command("train")
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help=DATA_HELP + " Or --from-topics.",
)
@click.option(
    "--from-topics",
    "from_topics",
    is_flag=True,
    help="Train on the shop's own retained topics (catalogue and events) instead of a folder.",
)
@click.option(
    "--from",
    "from_time",
    default=None,
    help="With --from-topics: first event time (ISO 8601, epoch ms, -2h ...; default: all "
    "retained).",
)
@click.option(
    "--to", "to_time", default=None, help="With --from-topics: end of the range (default: now)."
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="With --data: the version folder to write, e.g. .shoprec/model_archive/fused_ranker/3 "
    "(a candidate: `shoprec model promote 3` serves it).",
)
@click.option(
    "--no-promote",
    is_flag=True,
    help="With --from-topics: keep the new version a candidate even if it beats the live one.",
)
@click.option(
    "--sasrec-minutes",
    default=10.0,
    show_default=True,
    help="With --from-topics: SASRec's training budget for the model card (0 = leave it out).",
)
@click.option(
    "--epochs",
    default=12,
    show_default=True,
    help="Most epochs; early stopping usually ends sooner.",
)
@click.option("--seed", default=7, show_default=True, help="Seed of every random choice.")
@click.option(
    "--no-text", is_flag=True, help="Ablation: ignore BERT vectors (behaviour and signals only)."
)
@_cache_option
@_with_split
def train(
    data: Path | None,
    from_topics: bool,
    from_time: str | None,
    to_time: str | None,
    out: Path | None,
    no_promote: bool,
    sasrec_minutes: float,
    epochs: int,
    seed: int,
    no_text: bool,
    cache: Path,
    valid_frac: float,
    test_frac: float,
    threads: int,
) -> None:
    """Train the fused ranker: on a dataset folder (--data, --out) or on the shop's own
    retained topics (--from-topics).

    The model starts as the baselines (co-visitation, popularity) and keeps what it learns
    only where the validation period says it ranks better; a shop with too few users to
    validate on gets the baseline model.  Uses a GPU when there is one.

    With --from-topics the catalogue topic and the event topics are read over the range,
    replayed through the live feature code, split by time (train, validation, the latest
    slice held out), trained, and judged on the held-out slice against the live version
    and every baseline.  The new version goes to SHOPREC_MODEL_ARCHIVE with its model card
    (card.json), and is promoted into SHOPREC_MODEL_REPO and loaded by every Triton server
    only if it beats the live version by the learner's rule (see `shoprec learner --help`).

    \b
    Examples:
      shoprec train --from-topics --from -30d
      shoprec train --data ../shared/data/rees46-sample \\
        --out .shoprec/model_archive/fused_ranker/3 && shoprec model promote 3 --force
    """
    if from_topics:
        if data is not None or out is not None:
            raise click.UsageError("--from-topics reads the topics: drop --data and --out")
        from ops.learn import LearnOptions
        from ops.ranges import parse_time

        now = int(time.time() * 1000)
        options = LearnOptions(
            from_ms=None if from_time is None else parse_time(from_time, now),
            to_ms=None if to_time is None else parse_time(to_time, now),
            valid_frac=valid_frac,
            test_frac=test_frac,
            train=_train_config(epochs, seed, no_text),
            sasrec_seconds=60.0 * sasrec_minutes if sasrec_minutes > 0 else None,
            cache_dir=cache,
        )
        _threads(threads)
        _train_from_topics(options, promote=not no_promote)
        return
    if data is None or out is None:
        raise click.UsageError("give --data and --out, or --from-topics")
    from ranking.train import train_fused

    ds = _load(data, cache, valid_frac, test_frac, threads)
    model, tables, report = train_fused(ds, _train_config(epochs, seed, no_text))
    _export(out, ds, model, tables, report)
    click.echo(
        f"best epoch {report['best_epoch']} ({report['kept']}), valid ndcg@10 "
        f"{report['valid_ndcg@10']}, {report['seconds']} s"
    )


def _train_from_topics(options: Any, promote: bool) -> None:
    from cli.main import _run, _settings
    from ops.learn import learn_once

    settings = _settings()
    options = options.judged_as(settings)
    result = _run(learn_once(settings, options, promote_if_better=promote, progress=True))
    click.echo(_card_table(result.card))
    verb = "promoted and loaded" if promote and result.decision.promote else "kept as a candidate"
    click.echo(f"version {result.version} {verb} ({result.folder}): {result.decision.reason}")
    choice = result.card.get("complements")
    if choice is not None:
        click.echo(
            f"after a purchase it takes {choice['served']} complements in {choice['order']} "
            f"order: {choice['reason']}"
        )


def _card_table(card: dict[str, Any]) -> str:
    """The held-out metrics of a model card as a small table."""
    lines = ["model          NDCG@10  95% CI            HR@10   MRR     n"]
    for name, m in card["held_out"].items():
        lo, hi = m["ndcg@10_ci95"]
        lines.append(
            f"{name:<14} {m['ndcg@10']:.4f}   [{lo:.4f}, {hi:.4f}]  {m['hr@10']:.4f}  "
            f"{m['mrr']:.4f}  {m['n']}"
        )
    return "\n".join(lines)


@click.command("evaluate")
@_data_option
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write the metrics (JSON).",
)
@click.option("--epochs", default=12, show_default=True, help="Most epochs for the learned models.")
@click.option("--seed", default=7, show_default=True, help="Seed of every random choice.")
@click.option(
    "--max-test-queries",
    default=1500,
    show_default=True,
    help="Evaluate on a fixed random sample of at most this many test queries (0 = all).",
)
@click.option(
    "--export",
    "export_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write the trained fused ranker there (e.g. model_repo/fused_ranker/2).",
)
@click.option(
    "--models",
    default="",
    help=f"Comma-separated subset of {','.join(MODELS)} (default all); results are merged "
    "into an existing --json file, so models can be evaluated in separate processes.",
)
@click.option(
    "--sasrec-minutes",
    default=0.0,
    show_default=True,
    help="Time budget for SASRec training (0 = until early stopping); the JSON says if it hit it.",
)
@click.option(
    "--same-ts-order",
    type=click.Choice(["hash", "file"]),
    default="hash",
    show_default=True,
    help="Order of events that share a timestamp: a hash of the event id (always), or the "
    "dataset file's order (only to measure what the hash changes).",
)
@click.option(
    "--origins",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Rolling-origin evaluation: train and test every model at this many time splits, "
    "each test period the --test-frac of events just before the next one's, and pool the "
    "test positives (more test users on a small shop; N times the training time).",
)
@_cache_option
@_with_split
def evaluate(
    data: Path,
    json_out: Path,
    epochs: int,
    seed: int,
    max_test_queries: int,
    export_dir: Path | None,
    models: str,
    sasrec_minutes: float,
    same_ts_order: str,
    origins: int,
    cache: Path,
    valid_frac: float,
    test_frac: float,
    threads: int,
) -> None:
    """HR@10, NDCG@10 (with a 95% bootstrap interval over test users) and MRR on DATA's
    test period, over the full catalogue; the fused ranker against each other model with a
    paired bootstrap interval (``versus_fused`` in the JSON).

    Models: popularity, co-visitation, repeat (the user's own past items by count),
    embedding-only (BERT cosine), a SASRec-style sequential model trained with
    cross-entropy on the same split, the fused ranker, and the fused ranker without
    text embeddings (ablation).  Every test event's item is ranked against every item
    the worker could show that user.

    With --origins N every model is trained and tested N times, as if the data ended 0,
    1, ..., N-1 test periods earlier (each origin sees only the events before its test
    period ends); the test positives of all origins are pooled, and the intervals
    resample each user with all their positives.  The JSON keeps each origin's figures
    and training details too (``details.<model>.per_origin``).

    \b
    Examples:
      shoprec evaluate --data ../shared/data/uci-online-retail --json bench/results/eval-uci.json
      shoprec evaluate --data ../shared/data/amazon-gift-cards-2018 --origins 4 \\
        --json bench/results/eval-amazon-gift-cards-2018.json
    """
    from ranking.data import Period
    from ranking.evaluate import Metrics, merge_report, sample_queries

    wanted = set(models.split(",")) if models else set(MODELS)
    if unknown := wanted - set(MODELS):
        raise click.BadParameter(f"unknown models {sorted(unknown)}; choose from {MODELS}")
    datasets: list[Any] = []
    parts: dict[str, list[tuple[Any, dict[str, Any]]]] = {}
    test_queries, test_users = 0, set[int]()
    for origin in range(origins):
        if origins > 1:
            click.echo(f"origin {origin + 1}/{origins}", err=True)
        ds = _load(data, cache, valid_frac, test_frac, threads, same_ts_order, origin)
        valid = sample_queries(ds.period(Period.VALID), 400, seed)
        test = sample_queries(ds.period(Period.TEST), max_test_queries or None, seed)
        datasets.append(ds)
        test_queries += len(test)
        test_users |= {q.user for q in test}
        export = export_dir if origin == 0 else None  # the model trained on all the data
        for name, (metrics, info) in _evaluate_models(
            ds, valid, test, wanted, epochs, seed, sasrec_minutes, export
        ).items():
            _echo_metrics(name, metrics, f"origin {origin + 1}/{origins}" if origins > 1 else "")
            parts.setdefault(name, []).append((metrics, info))
    common: dict[str, object] = {
        "test_sample": {"queries": test_queries, "users": len(test_users), "seed": seed},
        "same_ts_order": same_ts_order,
    }
    for name, runs in parts.items():
        metrics = Metrics.pooled([m for m, _ in runs])
        info = {**runs[0][1], "skipped_positives": metrics.skipped}  # the latest origin's
        if origins > 1:
            # Each origin's metrics and training details (the epochs kept, a cold start).
            info["per_origin"] = [
                {**m.to_json(), **i, "skipped_positives": m.skipped} for m, i in runs
            ]
            _echo_metrics(name, metrics, f"{origins} origins pooled")
        merge_report(json_out, datasets, name, metrics, info, common)
    click.echo(f"wrote {json_out}", err=True)


def _echo_metrics(name: str, metrics: Any, where: str) -> None:
    m = metrics.to_json()
    lo, hi = m["ndcg@10_ci95"]
    click.echo(
        f"{name}{f' ({where})' if where else ''}: NDCG@10 {m['ndcg@10']:.4f} "
        f"[{lo:.4f}, {hi:.4f}], HR@10 {m['hr@10']:.4f}, MRR {m['mrr']:.4f}, n {m['n']} "
        f"({metrics.skipped} unshowable skipped)",
        err=True,
    )


def _evaluate_models(
    ds: Any,
    valid: list[Any],
    test: list[Any],
    wanted: set[str],
    epochs: int,
    seed: int,
    sasrec_minutes: float,
    export_dir: Path | None,
) -> dict[str, tuple[Any, dict[str, Any]]]:
    """Train the wanted models on ``ds``'s training period and score ``test``."""
    from ranking.baselines import SASRecConfig, baseline_scorers, train_sasrec
    from ranking.evaluate import evaluate_scorer
    from ranking.train import FusedScorer, train_fused

    out: dict[str, tuple[Any, dict[str, Any]]] = {}
    if wanted & {"popularity", "covisitation", "repeat", "embedding"}:
        scorers, extra = baseline_scorers(ds, valid)
        for name, scorer in scorers.items():
            if name in wanted:
                out[name] = (evaluate_scorer(scorer, test, desc=name), extra)
    if "sasrec" in wanted:
        sas_cfg = dataclasses.replace(SASRecConfig(), seed=seed, max_seconds=60.0 * sasrec_minutes)
        sas, sas_info = train_sasrec(ds, valid, sas_cfg)
        info = {k: v for k, v in sas_info.items() if k != "history"}
        out["sasrec"] = (evaluate_scorer(sas, test, desc="sasrec"), info)
    for name, no_text in (("fused", False), ("fused_no_text", True)):
        if name not in wanted:
            continue
        t = time.perf_counter()
        model, tables, rep = train_fused(ds, _train_config(epochs, seed, no_text))
        metrics = evaluate_scorer(
            FusedScorer(model, tables, rep["model"]["history_len"]), test, desc=name
        )
        info = {k: v for k, v in rep.items() if k not in ("history", "config", "model")}
        info["total_seconds"] = round(time.perf_counter() - t, 1)
        out[name] = (metrics, info)
        if name == "fused" and export_dir is not None:
            _export(export_dir, ds, model, tables, rep)
    return out


@click.command("learner")
@click.option(
    "--threads",
    default=1,
    show_default=True,
    help="CPU threads for torch while training (one is fastest on a small shared CPU).",
)
def learner(threads: int) -> None:
    """Retrain the ranker on the shop's own stream and promote only what is better.

    Runs until Ctrl-C / SIGTERM (a round in progress stops within a training batch and
    leaves no candidate), beside the workers (exactly one per shop).  Every
    SHOPREC_LEARNER_EVERY_S seconds, or after SHOPREC_LEARNER_EVERY_EVENTS new events, it
    reads the retained topics (the last SHOPREC_LEARNER_WINDOW_S, or all), trains a
    candidate as `shoprec train --from-topics` does, and scores it and the live version on
    the latest events held out by time.  It asks every Triton server (each host:port of
    SHOPREC_TRITON_URL, every address of each host) to load the candidate only when it
    never scores lower than the live version, on those events or on the same events taken
    one at a time (the next event after each event: what the stream serves), and either
    beats it by SHOPREC_LEARNER_MARGIN of its NDCG@10 with 95% confidence (a paired
    bootstrap over test users) or replaces this shop's own earlier round
    (SHOPREC_LEARNER_REFRESH: the same recipe on newer events).  The shipped model and
    another shop's weights need the confident gain.  Otherwise the live version stays and
    the log says why.  Candidates wait in SHOPREC_MODEL_ARCHIVE, never in the served
    SHOPREC_MODEL_REPO; every decision is in its history.jsonl (`shoprec model list`).
    Prometheus metrics on SHOPREC_METRICS_HOST:SHOPREC_METRICS_PORT: last training, last
    promotion, the live version's held-out NDCG@10.
    """
    import signal

    from cli.main import _run, _settings
    from ops.learner import Learner

    _threads(threads)
    settings = _settings()

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await Learner(settings).run(stop)

    _run(go())


@click.group("model")
def model() -> None:
    """The ranker's versions: what is served, what waits, rollback."""


@model.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def model_list(as_json: bool) -> None:
    """Every version: served (the newest is live) or archived (candidate, retired), with
    its held-out NDCG@10 and the last decisions."""
    from cli.main import _echo_json, _settings
    from ops.versions import Versions
    from ranking import export

    versions = Versions.from_settings(_settings())
    live = versions.live()
    rows = []
    for where, numbers in (("served", versions.served()), ("archive", versions.archived())):
        for n in numbers:
            card = versions.card(n) or {}
            held = card.get("held_out", {}).get("candidate", {})
            # From the artefact, what Triton serves (a `model promote` judgement may have
            # changed it since the card's first judgement).
            complements, order = export.served_complements(versions.folder(n))
            rows.append(
                {
                    "version": n,
                    "where": where,
                    "live": n == live,
                    "created": card.get("created"),
                    "ndcg@10": held.get("ndcg@10"),
                    "ndcg@10_ci95": held.get("ndcg@10_ci95"),
                    "complements": complements,
                    "complement_order": order,
                    "decision": card.get("decision", {}).get("reason"),
                }
            )
    rows.sort(key=lambda r: r["version"])
    if as_json:
        _echo_json({"versions": rows, "history": versions.history()[-20:]})
        return
    for r in rows:
        mark = "*" if r["live"] else " "
        ndcg = "-" if r["ndcg@10"] is None else f"{r['ndcg@10']:.4f} {r['ndcg@10_ci95']}"
        after = "setting" if r["complements"] is None else f"{r['complements']}"
        after += f", {r['complement_order']}" if r["complements"] != 0 else ""
        click.echo(
            f"{mark} {r['version']:>4}  {r['where']:<8} {ndcg:<28} {after:<16} "
            f"{r['decision'] or ''}"
        )
    click.echo(
        f"(* = live; after a purchase: how many complements and in which order, 'setting' = "
        f"SHOPREC_COMPLEMENTS_AFTER_PURCHASE; served from {versions.served_dir}, archive "
        f"{versions.archive_dir})"
    )


@model.command("rollback")
def model_rollback() -> None:
    """Serve the previous version again: the live one moves back to the archive and every
    Triton server loads the one before it (also what a restarted server serves)."""
    from cli.main import _run, _settings
    from ops.learn import rollback

    settings = _settings()
    retired, live, problems = _run(rollback(settings, _versions(settings)))
    click.echo(f"version {retired} retired; version {live} is live")
    for endpoint, problem in problems.items():
        click.echo(f"warning: Triton {endpoint}: {problem}", err=True)
    if problems:
        raise SystemExit(1)


@model.command("promote")
@click.argument("version", type=int)
@click.option(
    "--force",
    is_flag=True,
    help="Promote without judging it on the current topics (an operator's decision).",
)
def model_promote(version: int, force: bool) -> None:
    """Promote an archived candidate VERSION: judged first on the shop's current topics
    against the live version, with the learner's rule, unless --force."""
    from cli.main import _run, _settings
    from ops.learn import LearnOptions, judge_version, promote, read_shop

    settings = _settings()
    versions = _versions(settings)
    reason = "forced by an operator"
    if not force:
        history = _run(read_shop(settings, None, None))
        verdict = judge_version(
            settings, history, versions, version, LearnOptions().judged_as(settings)
        )
        click.echo(_card_table(verdict.card()))
        if not verdict.decision.promote:
            versions.record(
                {
                    "action": "rejected",
                    "version": version,
                    "live": verdict.live_version,
                    "reason": verdict.decision.reason,
                }
            )
            raise click.ClickException(f"version {version} not promoted: {verdict.decision.reason}")
        reason = verdict.decision.reason
    problems = _run(promote(settings, versions, version, reason))
    click.echo(f"version {version} promoted: {reason}")
    for endpoint, problem in problems.items():
        click.echo(f"warning: Triton {endpoint}: {problem}", err=True)


def _versions(settings: Any) -> Any:
    from ops.versions import Versions

    return Versions.from_settings(settings)


COMMANDS = (train, evaluate, learner, model)
