"""``shoprec train --from-topics`` on each shop's own stream, against every baseline.

Per dataset, as a shop would: a private stack (Apache Kafka, Redis), the catalogue and the
events sent to that shop's topics with ``shoprec produce --keep-ts`` (the recorded event
times), then ``shoprec train --from-topics --no-promote``: it reads the topics back, replays
them through the live feature code, trains, and judges the new version on the latest slice
held out by time against the live version (the shipped ``fused_ranker``, trained on
rees46), SASRec, co-visitation, BERT cosine and popularity.  The numbers are its model
card's: NDCG@10 over the full catalogue with 95% bootstrap intervals over test users, and
the candidate minus each other model, paired.

The split is ``shoprec train``'s default (validation and held-out slices of 10% of the
events each, by time), as in ``shoprec evaluate``'s table; the numbers differ from that
table by what reading the stream changes (events the worker would dead-letter are left
out) and by the learner's judging (its own sample of held-out queries).

    python -m bench.from_topics --json bench/results/from-topics.json
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import orjson

from bench.e2e import bench_stack
from bench.report import (
    REPO_ROOT,
    Bar,
    bar,
    bars_with_intervals,
    data_option,
    datasets,
    json_option,
    publish,
    shoprec,
)

MODELS = ("candidate", "live", "sasrec", "repeat", "covisitation", "embedding", "popularity")
"""The model card's names, in the plot's order."""


def one_shop(
    env: dict[str, str], folder: Path, work: Path, epochs: int, sasrec_minutes: float
) -> dict[str, Any]:
    """Send one dataset to its own topics, train from them, and return its model card's
    judgement."""
    archive = work / f"archive-{folder.name}"
    shop_env = env | {
        "SHOPREC_TOPIC_PREFIX": f"{folder.name}.",
        "SHOPREC_APP_ID": f"shoprec-{folder.name}",
        "SHOPREC_MODEL_ARCHIVE": str(archive),
    }
    t0 = time.perf_counter()
    shoprec(shop_env, "produce", "--data", str(folder.resolve()), "--keep-ts")
    sent_s = time.perf_counter() - t0
    click.echo(f"{folder.name}: sent in {sent_s:.0f} s; training from the topics ...", err=True)
    out = shoprec(
        shop_env,
        "train",
        "--from-topics",
        "--no-promote",
        "--epochs",
        str(epochs),
        "--sasrec-minutes",
        str(sasrec_minutes),
    )
    click.echo(out, err=True)
    (card_path,) = archive.glob("fused_ranker/*/card.json")
    card = orjson.loads(card_path.read_bytes())
    training = card["training"]
    return {
        "dataset": folder.name,
        "send_seconds": round(sent_s, 1),
        "round_seconds": round(time.perf_counter() - t0 - sent_s, 1),
        "data": {
            k: card["data"][k]
            for k in ("records_read", "events_used", "dead_letters", "users", "items")
        },
        "split": card["split"],
        "training": {
            k: training.get(k)
            for k in ("seconds", "best_epoch", "kept", "cold_shop", "valid_users", "sasrec")
        },
        "held_out": card["held_out"],
        "candidate_minus": card["versus"],
        # The same slice one event per step (the stream's task): the candidate and the live
        # version only, absent where there was no live version to judge against.
        "next_event": card.get("held_out_next_event", {}),
        "next_event_minus": card.get("versus_next_event", {}),
        "decision": card["decision"],
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    series: dict[str, Sequence[Bar]] = {}
    for name in MODELS:
        if all(name in r["held_out"] for r in results):
            series[name] = [bar(r["held_out"][name], "ndcg@10") for r in results]
    bars_with_intervals(
        path,
        [r["dataset"] for r in results],
        series,
        "NDCG@10 on the held-out slice (95% CI)",
        "shoprec train --from-topics on each shop's own stream",
    )


@click.command()
@data_option
@click.option("--epochs", default=8, show_default=True, help="Most epochs of the fused ranker.")
@click.option(
    "--sasrec-minutes",
    default=8.0,
    show_default=True,
    help="SASRec's training budget per shop (the model card's baseline).",
)
@json_option
def main(
    folders: tuple[Path, ...], epochs: int, sasrec_minutes: float, json_path: Path | None
) -> None:
    """Train each shop's ranker from its own topics and compare it with every baseline on
    the latest events held out by time (a private Kafka and Redis, removed afterwards)."""
    results = []
    with (
        tempfile.TemporaryDirectory(prefix="shoprec-from-topics-") as tmp,
        bench_stack("kafka", REPO_ROOT / "model_repo", 0, services=("broker", "redis")) as s,
    ):
        env = {**os.environ, **s.as_env(), "SHOPREC_MODEL_REPO": str(REPO_ROOT / "model_repo")}
        for folder in datasets(folders):
            results.append(one_shop(env, folder, Path(tmp), epochs, sasrec_minutes))
    publish(
        "from_topics",
        {"epochs": epochs, "sasrec_minutes": sasrec_minutes},
        results,
        json_path,
        plot,
    )


if __name__ == "__main__":
    main()
