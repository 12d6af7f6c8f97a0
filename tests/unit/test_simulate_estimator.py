"""``ops/simulate.py`` without services or model files: how an experiment becomes an
estimate, which scorer each arm gets, the errors a user can meet, and the replay estimator
on a hand-made dataset whose credit is counted by hand (items without text: no MiniLM).
"""

from __future__ import annotations

import gzip
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from cli.experiment import _thin_evidence
from cli.experiment import experiment as experiment_cli
from features.attribution import ShownList
from ops.simulate import (
    REPLAY_ARM,
    SimulateOptions,
    as_estimate,
    compared_control,
    default_experiment,
    held_out_from,
    offline_scorer,
    simulate,
)
from ranking.pipeline import FallbackScorer
from shoprec.errors import ConfigError, DatasetError
from shoprec.experiments import Arm, Experiment
from shoprec.settings import Settings
from streams.experiment import CovisitationScorer

T0 = 1_700_000_000_000
WINDOW = 1_800_000  # the default attribution window, 30 minutes


def experiment(*arms: dict[str, Any], control: str | None = None) -> Experiment:
    doc: dict[str, Any] = {"name": "t", "arms": list(arms), "click_types": ["view"]}
    if control:
        doc["control"] = control
    return Experiment.model_validate(doc)


COVIS = {"name": "covis", "kind": "covisitation", "share": 0.45}
RETRIEVAL = {"name": "retrieval", "kind": "retrieval", "share": 0.45}
HOLDOUT = {"name": "holdout", "kind": "holdout", "share": 0.1}


def test_an_estimate_scores_every_arm_as_a_shadow_of_a_replay_that_shows_nothing() -> None:
    est = as_estimate(experiment(HOLDOUT, COVIS, RETRIEVAL, control="holdout"))
    assert [(a.name, a.kind, a.shadow) for a in est.arms] == [
        (REPLAY_ARM, "holdout", False),
        ("covis", "covisitation", True),
        ("retrieval", "retrieval", True),
    ]
    assert est.control_arm == REPLAY_ARM and est.bandit is None


def test_the_compared_control_is_the_experiments_unless_it_makes_no_lists() -> None:
    assert compared_control(experiment(COVIS, RETRIEVAL, HOLDOUT, control="retrieval")) == (
        "retrieval"
    )
    assert compared_control(experiment(HOLDOUT, COVIS, RETRIEVAL, control="holdout")) == "covis"


def test_the_default_is_the_ranker_against_covisitation_with_views_as_clicks() -> None:
    plain, with_bandit = default_experiment(False), default_experiment(True, every_s=60.0)
    assert [a.kind for a in plain.arms] == ["ranker", "covisitation"]
    assert plain.counts_as("view") == "click" and plain.bandit is None
    assert with_bandit.bandit is not None and with_bandit.bandit.every_s == 60.0


def test_each_arm_gets_its_scorer_and_a_missing_model_says_where(tmp_path: Path) -> None:
    assert isinstance(
        offline_scorer(tmp_path, Arm(name="c", kind="covisitation")), CovisitationScorer
    )
    assert isinstance(offline_scorer(tmp_path, Arm(name="r", kind="retrieval")), FallbackScorer)
    with pytest.raises(ConfigError, match="does not score"):
        offline_scorer(tmp_path, Arm(name="h", kind="holdout"))
    with pytest.raises(ConfigError, match="no fused_ranker version"):
        offline_scorer(tmp_path, Arm(name="m", kind="ranker"))
    (tmp_path / "fused_ranker" / "1").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no version 7"):
        offline_scorer(tmp_path, Arm(name="m", kind="ranker", model_version="7"))


def write_dataset(folder: Path, events: Sequence[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "items.jsonl.gz", "wb") as fh:
        fh.write(b"".join(orjson.dumps({"item_id": i}) + b"\n" for i in "abcdef"))
    with gzip.open(folder / "events.jsonl.gz", "wb") as fh:
        fh.write(b"".join(orjson.dumps(e) + b"\n" for e in events))
    return folder


def hand_made() -> list[dict[str, Any]]:
    """Five shoppers view a then b, half a second later (so a's list holds b and is
    credited); z and y view a, then b: z within the window, y exactly at its end (still
    credited); then z views a after every list that held it is out of the window, and
    buys c, which no list held."""
    out: list[dict[str, Any]] = []

    def add(user: str, at: int, item: str, kind: str = "view") -> None:
        out.append(
            {"event_id": f"e{len(out)}", "type": kind, "user_id": user, "item_id": item, "ts": at}
        )

    for k in range(6):  # w0's view of a comes before anyone is known: no list
        add(f"w{k}", T0 + k * 1000, "a")
        add(f"w{k}", T0 + k * 1000 + 500, "b")
    add("z", T0 + 60_000, "a")
    add("y", T0 + 61_000, "a")
    add("z", T0 + 120_000, "b")
    add("y", T0 + 61_000 + WINDOW, "b")
    add("z", T0 + 120_000 + WINDOW + 1, "a")
    add("z", T0 + 120_000 + 2 * WINDOW, "c", "purchase")
    return sorted(out, key=lambda e: int(e["ts"]))


async def test_the_replay_credits_what_the_rule_says_on_a_hand_made_dataset(
    tmp_path: Path,
) -> None:
    data = write_dataset(tmp_path / "tiny", hand_made())
    shown: list[tuple[str, ShownList]] = []
    progress: list[int] = []

    def keep(lists: Mapping[str, Sequence[ShownList]]) -> None:
        shown.extend((u, lst) for u, many in lists.items() for lst in many)

    opts = SimulateOptions(
        data=data,
        experiment=experiment(COVIS, RETRIEVAL, HOLDOUT),
        model_repo=tmp_path / "no-models",  # neither arm needs one
        cache=None,
    )
    report = await simulate(Settings(_env_file=None), opts, progress.append, keep)
    assert progress == [18]
    assert set(report.arms) == {REPLAY_ARM, "covis", "retrieval"}  # the holdout left out
    assert report.control == "covis"
    credited_lists = [
        (u, lst.ts - T0)
        for u, lst in shown
        if lst.arm == "covis" and u != "z" and lst.items[:1] == ("b",)
    ]
    # w1..w5 at their view of a, and y: each list of a holds b.
    assert len(credited_lists) == 6, shown
    for name in ("covis", "retrieval"):
        arm = report.arms[name]
        assert arm.shadow and arm.lists == report.arms["covis"].lists
        # w1..w5, z within the window, y at its very end; not z's late view, not the purchase.
        assert (arm.clicks, arm.carts, arm.purchases) == (7, 0, 0), name
    replay = report.arms[REPLAY_ARM]
    assert (replay.users, replay.lists, replay.buyers) == (8, 0, 1)


async def test_errors_name_what_to_fix(tmp_path: Path) -> None:
    settings = Settings(_env_file=None)
    opts = SimulateOptions(data=tmp_path, experiment=default_experiment(False), model_repo=tmp_path)
    with pytest.raises(DatasetError, match=r"lacks items\.jsonl\.gz, events\.jsonl\.gz"):
        await simulate(settings, opts)
    data = write_dataset(tmp_path / "empty", [])
    empty = SimulateOptions(
        data=data, experiment=experiment(COVIS, RETRIEVAL, HOLDOUT), model_repo=data
    )
    with pytest.raises(DatasetError, match="holds no events"):
        await simulate(settings, empty)
    with pytest.raises(ConfigError, match="has no bandit"):
        await simulate(settings, SimulateOptions(**{**empty.__dict__, "bandit": True}))
    only_holdout = experiment({**HOLDOUT, "share": 1.0})
    with pytest.raises(ConfigError, match="no arm that makes lists"):
        await simulate(
            settings, SimulateOptions(data=data, experiment=only_holdout, model_repo=data)
        )
    no_window = Settings(_env_file=None, attribution_window_ms=0)
    with pytest.raises(ConfigError, match="SHOPREC_ATTRIBUTION_WINDOW_MS is 0"):
        await simulate(no_window, empty)


async def test_lists_only_from_score_from_on_with_the_state_built_before(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "tiny", hand_made())
    shown: list[ShownList] = []
    opts = SimulateOptions(
        data=data,
        experiment=experiment(COVIS, RETRIEVAL, HOLDOUT),
        model_repo=tmp_path,
        cache=None,
        score_from_ms=T0 + 60_000,
    )
    report = await simulate(
        Settings(_env_file=None),
        opts,
        on_show=lambda m: shown.extend(lst for many in m.values() for lst in many),
    )
    assert shown and min(lst.ts for lst in shown) == T0 + 60_000
    # z and y still get b after a: the co-visitation the w shoppers left in the store.
    assert [(a.clicks, a.purchases) for n, a in report.arms.items() if n != REPLAY_ARM] == [
        (2, 0),
        (2, 0),
    ]


def test_the_held_out_periods_are_the_trainers(tmp_path: Path) -> None:
    events = hand_made()
    data = write_dataset(tmp_path / "tiny", events)
    ts = sorted(int(e["ts"]) for e in events)
    assert held_out_from(data, "valid") == ts[int(18 * 0.8)]
    assert held_out_from(data, "test") == ts[int(18 * 0.9)]


def test_the_command_explains_itself_and_its_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    helped = runner.invoke(experiment_cli, ["simulate", "--help"])
    assert helped.exit_code == 0
    assert "predicted" in helped.output and "--score-from" in helped.output
    missing = runner.invoke(experiment_cli, ["simulate", "--data", str(tmp_path)])
    assert missing.exit_code == 1 and "lacks items.jsonl.gz" in missing.output
    data = write_dataset(tmp_path / "tiny", hand_made())
    bad = runner.invoke(experiment_cli, ["simulate", "--data", str(data), "--score-from", "x"])
    assert bad.exit_code == 2 and "--score-from" in bad.output


def test_thin_evidence_is_said_on_stderr() -> None:
    def arm(clicks: int, carts: int, purchases: int) -> SimpleNamespace:
        return SimpleNamespace(lists=100, clicks=clicks, carts=carts, purchases=purchases)

    def report(*arms: SimpleNamespace) -> SimpleNamespace:
        for i, a in enumerate(arms):
            a.name = f"a{i}"
        return SimpleNamespace(arms={a.name: a for a in arms})

    assert "no list of any arm was credited" in _thin_evidence(report(arm(0, 0, 0)), WINDOW)[0]
    assert _thin_evidence(report(arm(50, 0, 0), arm(30, 0, 0)), WINDOW) == []
    said = _thin_evidence(report(arm(50, 3, 0), arm(30, 0, 25)), WINDOW)
    assert said == [
        "arm a0: few credited carts (3), purchases (0): those rates' intervals "
        "(normal approximations) are rough",
        "arm a1: few credited carts (0): those rates' intervals (normal approximations) are rough",
    ]


async def test_a_score_from_past_the_replayed_events_is_an_error(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "tiny", hand_made())
    opts = SimulateOptions(
        data=data,
        experiment=experiment(COVIS, RETRIEVAL, HOLDOUT),
        model_repo=tmp_path,
        cache=None,
        limit=5,
        score_from_ms=T0 + 60_000,
    )
    with pytest.raises(DatasetError, match="no list was made at or after the score-from"):
        await simulate(Settings(_env_file=None), opts)
