"""How fresh the learner keeps a shop's model, offline: ``python -m bench.learner_rounds``.

A learner that keeps running retrains as the events come
(``SHOPREC_LEARNER_EVERY_EVENTS``), and whether a fresher model reaches the shop depends
on the promotion rule (``ops.learn.decide``).  ``bench.stream_quality`` measures that on
the served path, one stack per shop; this replays it offline, where a round costs
seconds, under several rules at once:

1. rounds at 70%, 80% and 90% of the events (every 10%): each trains a candidate on the
   events so far exactly as a learner round does (``build_dataset`` with the learner's
   split, ``train_fused`` with its options) and judges it against the live version on its
   latest slice held out by time, the basket steps and the next event (``decide``); the
   shipped model (the newest version of ``model_repo``) is live at the start;
2. three promotion policies: ``rule`` (``decide`` as shipped: a gain whose 95% interval
   clears the margin, or, once the shop's own round is live, a candidate that scores no
   lower on either slice: the same recipe on newer events, ``SHOPREC_LEARNER_REFRESH``),
   ``confident gain only`` (``SHOPREC_LEARNER_REFRESH=false``) and ``first round only``;
3. each 10% segment of the last 30% is served by the version each policy had live when the
   segment began, and scored one event per step (``ranking.data.event_steps``: what the
   stream serves, over the full catalogue) against co-visitation on the same steps.
   NDCG@10 pooled over the three segments, the difference paired by user (95% bootstrap).

Each round also records whether complements after a purchase would help its candidate and
the shipped version (``ops.learn.next_event_and_complements`` on the round's held-out next
events: served with ``SHOPREC_COMPLEMENTS_AFTER_PURCHASE`` complements in co-purchase
order, in the ranker's order, and without); the served quality above is the rankers' own
order, without them.

It measures the recipe and the rule, not the served path: candidates, Triton and the
worker's timing are ``bench.stream_quality``'s.

    python -m bench.learner_rounds --max-events 40000 --json bench/results/learner-rounds.json
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import click

from bench.report import (
    REPO_ROOT,
    bar,
    bars_with_intervals,
    data_option,
    datasets,
    json_option,
    publish,
    say,
)
from ops.learn import LearnOptions, cold_baselines, decide, next_event_and_complements
from ops.versions import Versions
from ranking import export
from ranking.baselines import baseline_scorers
from ranking.data import (
    F32,
    Catalogue,
    Dataset,
    Events,
    Period,
    build_dataset,
    embed_catalogue,
    event_steps,
    load_catalogue,
    load_events,
    origin_end,
)
from ranking.evaluate import (
    Metrics,
    Scorer,
    evaluate_scorer,
    paired_difference,
    sample_queries,
)
from ranking.train import FusedScorer, behavioural_ids, train_fused, version_scorer
from shoprec.settings import CACHE_DIR, Settings

SEGMENT = 0.1
"""The share of the events between two rounds."""
ROUNDS = 3
"""Rounds at 70%, 80% and 90% of the events: each serves the next ``SEGMENT``."""
RULE, CONFIDENT, FIRST_ONLY = "rule", "confident gain only", "first round only"
POLICIES = (RULE, CONFIDENT, FIRST_ONLY)


class Shop(NamedTuple):
    name: str
    catalogue: Catalogue
    events: Events
    item_emb: F32


def rounds(full: Shop, options: LearnOptions, work: Path) -> list[dict[str, Any]]:
    """Each round's verdict under every policy, and the version each policy then serves."""
    shipped = Versions(REPO_ROOT / "model_repo", work)
    live_version = shipped.live()
    assert live_version is not None, "model_repo serves a ranker"
    start = shipped.folder(live_version)  # what a new shop starts with
    live = dict.fromkeys(POLICIES, start)
    names = {start: f"v{start.name} (shipped)"}
    out: list[dict[str, Any]] = []
    for r in range(ROUNDS):
        # Round r reads what the topics hold where rolling origin ROUNDS - r's test ends.
        ev, share = full.events, 1.0 - (ROUNDS - r) * SEGMENT
        end = origin_end(ev.ts, SEGMENT, ROUNDS - r)
        assert end is not None  # None only for origin 0, the whole stream
        ds = build_dataset(
            full.name,
            full.catalogue,
            ev.subset(ev.ts < end),
            full.item_emb,
            options.valid_frac,
            options.test_frac,
            progress=False,
        )
        model, tables, report = train_fused(ds, options.train, progress=False)
        folder = work / f"round-{r}"
        export.save(folder, model, export.config_of(report), behavioural_ids(ds, tables), report)
        cand = FusedScorer(model, tables, report["model"]["history_len"])
        seed = options.train.seed
        test = sample_queries(ds.period(Period.TEST), options.max_test_queries, seed)
        steps = event_steps(ds, Period.TEST, limit=options.max_test_queries, seed=seed)
        got = evaluate_scorer(cand, test, progress=False)
        got_next, cand_choice = next_event_and_complements(cand, steps, options.complements)
        # The complements and the policies below often ask for the same version.
        loaded: dict[Path, Scorer] = {}
        complements: dict[str, dict[str, Any]] = {}
        if options.complements is not None:
            from_start = next_event_and_complements(
                _loaded(loaded, start, ds), steps, options.complements
            )[1]
            for name, chosen in (("candidate", cand_choice), ("shipped", from_start)):
                assert chosen is not None  # asked for: options.complements is set
                complements[name] = chosen.to_json()
        # Policies often share a live version: each is scored once.
        judged: dict[Path, tuple[Metrics, Metrics]] = {}
        verdicts: dict[str, str] = {}
        for policy in POLICIES:
            current = live[policy]
            if policy == FIRST_ONLY and r > 0:
                verdicts[policy] = "kept: one round only"
                continue
            if current not in judged:
                old = _loaded(loaded, current, ds)
                judged[current] = (
                    evaluate_scorer(old, test, progress=False),
                    evaluate_scorer(old, steps, progress=False),
                )
            old_test, old_next = judged[current]
            d = decide(
                got,
                old_test,
                options.margin,
                (got_next, old_next),
                # The live version is the shop's own round once one was promoted.
                refresh=policy == RULE and current != start,
                baselines=cold_baselines(report) and current == start,
            )
            verdicts[policy] = ("promoted: " if d.promote else "kept: ") + d.reason
            if d.promote:
                live[policy] = folder
        names[folder] = f"round at {share:.0%}"
        say(f"  {names[folder]}: " + "; ".join(f"{p}: {v}" for p, v in verdicts.items()))
        for name, choice in complements.items():
            served, order = choice["served"], choice["order"]
            say(f"    complements, {name}: {served} in {order} order: {choice['reason']}")
        out.append(
            {
                "at": share,
                "candidate": report.get("kept"),
                "verdicts": verdicts,
                "complements": complements,
                "serves": {p: names[f] for p, f in live.items()},
                "folders": dict(live),
            }
        )
    return out


def _loaded(cache: dict[Path, Scorer], folder: Path, ds: Dataset) -> Scorer:
    """``folder``'s version scoring ``ds``, loaded once per ``cache``."""
    if folder not in cache:
        cache[folder] = version_scorer(folder, ds)[0]
    return cache[folder]


def served_quality(full: Shop, played: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    """Each policy's live versions on the segment after each round, one event per step,
    against co-visitation on the same steps."""
    scored: dict[str, list[Metrics]] = {p: [] for p in (*POLICIES, "co-visitation")}
    for k, done in enumerate(played):
        # The segment after round k: the test period of the origin that ends a segment later.
        ds = build_dataset(
            full.name,
            full.catalogue,
            full.events,
            full.item_emb,
            test_frac=SEGMENT,
            progress=False,
            origin=ROUNDS - 1 - k,
        )
        steps = event_steps(ds, Period.TEST, limit=3000, seed=seed)
        valid = sample_queries(ds.period(Period.VALID), 400, seed)
        covisitation = baseline_scorers(ds, valid)[0]["covisitation"]
        scored["co-visitation"].append(evaluate_scorer(covisitation, steps, progress=False))
        served: dict[Path, Metrics] = {}  # policies often serve the same version
        for policy in POLICIES:
            folder = done["folders"][policy]
            if folder not in served:
                scorer, _ = version_scorer(folder, ds)
                served[folder] = evaluate_scorer(scorer, steps, progress=False)
            scored[policy].append(served[folder])
    pooled = {name: Metrics.pooled(parts) for name, parts in scored.items()}
    covis = pooled["co-visitation"]
    out: dict[str, Any] = {"co-visitation": covis.to_json()}
    for policy in POLICIES:
        gain = paired_difference(pooled[policy], covis)
        out[policy] = pooled[policy].to_json() | {
            "minus_covisitation": gain.to_json(),
            "relative": round(gain.value / covis.ndcg, 4) if covis.ndcg else None,
            "per_segment": [round(m.ndcg, 4) for m in scored[policy]],
        }
    out["co-visitation"]["per_segment"] = [round(m.ndcg, 4) for m in scored["co-visitation"]]
    return out


def measure(folder: Path, max_events: int | None, options: LearnOptions) -> dict[str, Any]:
    catalogue = load_catalogue(folder)
    events = load_events(folder, catalogue)
    if max_events is not None:
        events = events.subset(slice(0, max_events))
    emb = embed_catalogue(catalogue, REPO_ROOT / CACHE_DIR)
    full = Shop(folder.name, catalogue, events, emb)
    with tempfile.TemporaryDirectory() as work:
        played = rounds(full, options, Path(work))
        quality = served_quality(full, played, options.train.seed)
    for r in played:
        del r["folders"]  # temporary; ``serves`` names them
    return {"events": len(events), "rounds": played, "served": quality}


def _plot(results: list[dict[str, Any]], path: Path) -> None:
    bars_with_intervals(
        path,
        [r["dataset"].split("-")[0] for r in results],
        {
            name: [bar(r["served"][name], "ndcg@10") for r in results]
            for name in ("co-visitation", *POLICIES)
        },
        "NDCG@10 of the next event, last 30% (95% CI)",
        "Learner rounds every 10% of the events: what each promotion policy serves",
    )


@click.command()
@data_option
@click.option(
    "--max-events",
    type=click.IntRange(min=1000),
    default=None,
    help="Only each shop's first events (UCI's 396,337 take about an hour).",
)
@json_option
def main(folders: tuple[Path, ...], max_events: int | None, json_path: Path | None) -> None:
    """Learner rounds every 10% of a shop's events, offline: what each promotion policy
    would serve over the last 30%, one event per step, against co-visitation."""
    options = dataclasses.replace(
        LearnOptions().judged_as(Settings()), cache_dir=REPO_ROOT / CACHE_DIR
    )
    results = []
    for folder in datasets(folders):
        at = (f"{1.0 - (ROUNDS - r) * SEGMENT:.0%}" for r in range(ROUNDS))
        say(f"{folder.name}: rounds at {', '.join(at)} ...")
        got = measure(folder, max_events, options)
        for name in POLICIES:
            row = got["served"][name]
            gain = row["minus_covisitation"]
            say(
                f"  {name}: NDCG@10 {row['ndcg@10']:.4f} against co-visitation "
                f"{got['served']['co-visitation']['ndcg@10']:.4f}, {gain['value']:+.4f} "
                f"[{gain['ci95'][0]:+.4f}, {gain['ci95'][1]:+.4f}] ({row['relative']:+.1%})"
            )
        results.append({"dataset": folder.name, **got})
    publish("learner_rounds", {"rounds": ROUNDS, "segment": SEGMENT}, results, json_path, _plot)


if __name__ == "__main__":
    main()
