"""``shoprec train`` and ``shoprec evaluate``: the fused ranker offline, on a real dataset."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import click

DATA_HELP = (
    "Dataset folder with events.jsonl.gz and items.jsonl.gz (e.g. ../shared/data/rees46-sample)."
)
CACHE_HELP = "Where item BERT vectors are cached between runs."


def _load(data: Path, cache: Path, valid_frac: float, test_frac: float, threads: int) -> Any:
    import torch

    from ranking.data import load_dataset

    # Small ops on two shared cores: one thread measured 5-8x faster per training step.
    torch.set_num_threads(threads)
    return load_dataset(data, valid_frac=valid_frac, test_frac=test_frac, cache_dir=cache)


def _train_config(epochs: int, seed: int, no_text: bool) -> Any:
    from ranking.model import RankerConfig
    from ranking.train import TrainOptions

    return TrainOptions(RankerConfig(use_text=not no_text), max_epochs=epochs, seed=seed)


def _export(folder: Path, ds: Any, model: Any, tables: Any, report: dict[str, Any]) -> None:
    from ranking import export
    from ranking.model import RankerConfig
    from ranking.train import behavioural_ids

    cfg = RankerConfig(**report["model"])
    export.save(folder, model, cfg, behavioural_ids(ds, tables), report)
    click.echo(f"model written to {folder}", err=True)


MODELS = ("popularity", "covisitation", "embedding", "sasrec", "fused", "fused_no_text")

_data_option = click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help=DATA_HELP,
)
_cache_option = click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".shoprec/cache"),
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
@_data_option
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Version folder to write, e.g. model_repo/fused_ranker/3 (Triton loads it in place).",
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
    data: Path,
    out: Path,
    epochs: int,
    seed: int,
    no_text: bool,
    cache: Path,
    valid_frac: float,
    test_frac: float,
    threads: int,
) -> None:
    """Train the fused ranker on DATA's past, early-stopped on its validation period.

    Uses a GPU when there is one, the CPU otherwise (minutes on the small datasets).
    Writes the weights and a training report into OUT; copy or write OUT inside
    model_repo/fused_ranker/ and Triton serves it as a new version.

    \b
    Example:
      shoprec train --data ../shared/data/rees46-sample --out model_repo/fused_ranker/2
    """
    from ranking.train import train_fused

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    ds = _load(data, cache, valid_frac, test_frac, threads)
    model, tables, report = train_fused(ds, _train_config(epochs, seed, no_text))
    _export(out, ds, model, tables, report)
    click.echo(
        f"best epoch {report['best_epoch']}, valid ndcg@10 {report['valid_ndcg@10']}, "
        f"{report['seconds']} s"
    )


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
    cache: Path,
    valid_frac: float,
    test_frac: float,
    threads: int,
) -> None:
    """HR@10, NDCG@10 and MRR on DATA's test period, over the full catalogue.

    Models: popularity, co-visitation, embedding-only (BERT cosine), a SASRec-style
    sequential model trained with cross-entropy on the same split, the fused ranker,
    and the fused ranker without text embeddings (ablation).  Every test event's item
    is ranked against every item the worker could show that user.

    \b
    Example:
      shoprec evaluate --data ../shared/data/uci-online-retail --json bench/results/eval-uci.json
    """
    from ranking.baselines import SASRecConfig, baseline_scorers, train_sasrec
    from ranking.data import Period
    from ranking.evaluate import evaluate_scorer, merge_report, sample_queries
    from ranking.train import FusedScorer, train_fused

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    wanted = set(models.split(",")) if models else set(MODELS)
    if unknown := wanted - set(MODELS):
        raise click.BadParameter(f"unknown models {sorted(unknown)}; choose from {MODELS}")
    ds = _load(data, cache, valid_frac, test_frac, threads)
    valid = sample_queries(ds.period(Period.VALID), 400, seed)
    test = sample_queries(ds.period(Period.TEST), max_test_queries or None, seed)
    common: dict[str, object] = {"test_sample": {"queries": len(test), "seed": seed}}

    def record(name: str, metrics: Any, info: dict[str, Any]) -> None:
        click.echo(f"{name}: {metrics.to_json()} ({metrics.skipped} unshowable skipped)", err=True)
        merge_report(
            json_out, ds, name, metrics, {**info, "skipped_positives": metrics.skipped}, common
        )

    if wanted & {"popularity", "covisitation", "embedding"}:
        scorers, extra = baseline_scorers(ds, valid)
        for name, scorer in scorers.items():
            if name in wanted:
                record(name, evaluate_scorer(scorer, test, desc=name), extra)
    if "sasrec" in wanted:
        sas_cfg = dataclasses.replace(SASRecConfig(), seed=seed, max_seconds=60.0 * sasrec_minutes)
        sas, sas_info = train_sasrec(ds, valid, sas_cfg)
        info = {k: v for k, v in sas_info.items() if k != "history"}
        record("sasrec", evaluate_scorer(sas, test, desc="sasrec"), info)
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
        record(name, metrics, info)
        if name == "fused" and export_dir is not None:
            _export(export_dir, ds, model, tables, rep)
    click.echo(f"wrote {json_out}", err=True)


COMMANDS = (train, evaluate)
