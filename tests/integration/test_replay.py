"""`shoprec replay` on the real stack: a real range replayed, twice, interrupted, and diffed.

One live run (real rees46 events through a real worker, its own state
prefix) feeds every test; the worker is stopped before any replay, so the
live state and recs.out can only change if a replay writes to them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import cast

import pytest
import tritonclient.grpc as grpcclient
from redis.asyncio import Redis

from infra.stack import Endpoints
from ops.rebuild import compare_state
from streams.topics import TopicNames
from tests.integration.ops_setup import (
    LiveRun,
    end_offsets,
    json_out,
    prefixed_snapshot,
    shoprec,
    snapshot,
    start_live_run,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
WHOLE_RANGE = ("--topic", "all", "--from-offset", "0:0,1:0")


@pytest.fixture(scope="module")
async def live(
    stack: Endpoints, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> LiveRun:
    return await start_live_run(stack, data_dir, tmp_path_factory.mktemp("replay-live"))


async def test_default_replay_writes_nothing_live_and_twice_leaves_identical_state(
    live: LiveRun, redis: Redis
) -> None:
    s = live.settings
    before_live = await snapshot(redis, exclude_prefixes=(live.prefix("r1"), live.prefix("r2")))
    first = json_out(
        shoprec(s, "replay", *WHOLE_RANGE, "--state-prefix", live.prefix("r1"), "--json")
    )
    assert first["complete"] and first["read"] == first["planned"] > len(live.events)
    assert first["recommendations"] > 0 and first["dead_letters"] == 3
    assert first["into"] == s.topic("recs.replay")

    # Nothing reached recs.out or any key outside the shadow prefix.
    assert await end_offsets(s, TopicNames.from_settings(s).recs_out) == live.recs_out_end
    assert (
        await snapshot(redis, exclude_prefixes=(live.prefix("r1"), live.prefix("r2")))
        == before_live
    )
    replayed = await end_offsets(s, s.topic("recs.replay"))
    assert sum(replayed.values()) == first["recommendations"]

    # The shadow state is the live state, user by user and counter by counter.
    same = await compare_state(redis, live.prefix("r1"), s.state_prefix)
    assert same.equal and same.users_equal == len({e["user_id"] for e in live.events}), same

    # Running it again resumes a finished run: nothing to read.
    again = json_out(
        shoprec(s, "replay", *WHOLE_RANGE, "--state-prefix", live.prefix("r1"), "--json")
    )
    assert again["read"] == 0 and again["resumed_from"] == first["planned"]

    # Re-reading the whole range into the same state changes nothing (ids are deduplicated).
    state_before = await prefixed_snapshot(redis, live.prefix("r1"))
    redo = json_out(
        shoprec(
            s, "replay", *WHOLE_RANGE, "--state-prefix", live.prefix("r1"), "--restart", "--json"
        )
    )
    assert redo["read"] == first["planned"] and redo["recommendations"] == 0
    assert redo["duplicates"] == len(live.events)
    assert await prefixed_snapshot(redis, live.prefix("r1")) == state_before

    # A second replay of the same range into fresh state builds the identical state.
    second = json_out(
        shoprec(s, "replay", *WHOLE_RANGE, "--state-prefix", live.prefix("r2"), "--json")
    )
    assert second["read"] == first["read"]
    twin = await compare_state(redis, live.prefix("r1"), live.prefix("r2"))
    assert twin.equal and twin.users_a == twin.users_b > 0, twin


async def test_live_targets_are_refused_without_live_flag(live: LiveRun) -> None:
    s = live.settings
    to_recs_out = shoprec(s, "replay", *WHOLE_RANGE, "--into", "recs.out", "--state-prefix", "x:")
    assert to_recs_out.returncode != 0 and "live output" in to_recs_out.stderr
    to_live = shoprec(s, "replay", *WHOLE_RANGE, "--state-prefix", s.state_prefix)
    assert to_live.returncode != 0 and "live state" in to_live.stderr


async def test_dry_run_plans_and_changes_nothing(live: LiveRun, redis: Redis) -> None:
    s = live.settings
    plan = json_out(shoprec(s, "replay", "--topic", "all", "--from", "-1d", "--dry-run", "--json"))
    assert plan["dry_run"] and plan["planned"] == len(live.events) + 3
    assert any("recs.replay" in w for w in plan["writes"])
    assert not [k async for k in redis.scan_iter(match="replay:*")]


async def test_interrupted_replay_resumes_to_the_same_state(live: LiveRun, redis: Redis) -> None:
    s = live.settings
    cut = json_out(
        shoprec(
            s,
            "replay",
            *WHOLE_RANGE,
            "--state-prefix",
            live.prefix("r3"),
            "--limit",
            "256",
            "--json",
        )
    )
    assert not cut["complete"] and 256 <= cut["read"] < cut["planned"]
    rest = json_out(
        shoprec(s, "replay", *WHOLE_RANGE, "--state-prefix", live.prefix("r3"), "--json")
    )
    assert rest["complete"] and rest["resumed_from"] == cut["read"]
    assert cut["read"] + rest["read"] == cut["planned"]
    same = await compare_state(redis, live.prefix("r3"), s.state_prefix)
    assert same.equal, same


def load_alternative_ranker(triton_url: str, name: str) -> None:
    """A changed model: the same ranker code with other fusion weights, loaded beside v1."""
    client = grpcclient.InferenceServerClient(triton_url)
    config = client.get_model_config("fused_ranker", as_json=True)["config"]
    config["name"] = name
    base = REPO / "model_repo" / "fused_ranker" / "1" / "model.py"
    source = f"""
import functools, importlib.util
from ranking import fusion
_spec = importlib.util.spec_from_file_location("_base_fused_ranker", {str(base)!r})
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)
_base.FusionScorer = functools.partial(
    fusion.FusionScorer, weights=fusion.FusionWeights(user=0.0, history=0.0, popularity=3.0)
)
TritonPythonModel = _base.TritonPythonModel
"""
    client.load_model(name, config=json.dumps(config), files={"file:1/model.py": source.encode()})
    assert client.is_model_ready(name)


async def test_diff_is_zero_for_the_same_model_and_not_for_another(
    live: LiveRun, stack: Endpoints
) -> None:
    s = live.settings
    for prefix, topic in ((live.prefix("d1"), "recs.d1"), (live.prefix("d2"), "recs.d2")):
        run = json_out(
            shoprec(s, "replay", *WHOLE_RANGE, "--state-prefix", prefix, "--into", topic, "--json")
        )
        assert run["recommendations"] > 0
    same = json_out(
        shoprec(s, "replay", "--diff", "--into", "recs.d2", "--against", "recs.d1", "--json")
    )
    assert same["compared"] == run["recommendations"] and same["differences"] == 0, same
    assert same["mean_overlap"] == 1.0

    load_alternative_ranker(stack.triton_url, "fused_ranker_alt")
    changed_run = shoprec(
        s,
        "replay",
        *WHOLE_RANGE,
        "--state-prefix",
        live.prefix("d3"),
        "--into",
        "recs.d3",
        "--json",
        SHOPREC_RANKER_MODEL="fused_ranker_alt",
    )
    assert json_out(changed_run)["recommendations"] == run["recommendations"]
    changed = json_out(
        shoprec(s, "replay", "--diff", "--into", "recs.d3", "--against", "recs.d1", "--json")
    )
    assert changed["compared"] == run["recommendations"]
    assert changed["changed"] > 0 and changed["mean_overlap"] < 1.0, changed
    assert set(changed["models"]["replay"]) == {"fused_ranker_alt@1"}

    # Against what the worker emitted live: every live trigger the replay also answered is
    # compared; the summary is there for an operator to judge (batches fall differently).
    vs_live = json_out(
        shoprec(s, "replay", "--diff", "--into", "recs.d1", "--against", "recs.out", "--json")
    )
    assert vs_live["compared"] > 0 and 0.0 <= vs_live["mean_overlap"] <= 1.0


async def test_ctrl_c_keeps_the_checkpoint_and_the_same_command_resumes(
    live: LiveRun, redis: Redis
) -> None:
    s = live.settings
    prefix = live.prefix("r4")
    args = ("replay", *WHOLE_RANGE, "--state-prefix", prefix, "--json")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        *args,
        # Slow enough that the checkpoint is seen mid-run even on a loaded machine.
        "--rate",
        "20",
        env={**os.environ, **s.as_env()},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while await checkpointed(redis, prefix) < 128:
            assert proc.returncode is None and time.monotonic() < deadline
            await asyncio.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err_bytes = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
    err = err_bytes.decode()
    assert proc.returncode == 130 and "run the same command to resume" in err, err[-2000:]
    done = await checkpointed(redis, prefix)
    rest = json_out(shoprec(s, *args))
    assert rest["complete"] and rest["resumed_from"] == done >= 128
    same = await compare_state(redis, prefix, s.state_prefix)
    assert same.equal, same


async def checkpointed(redis: Redis, prefix: str) -> int:
    """Records a replay under ``prefix`` has checkpointed as done."""
    total = 0
    async for key in redis.scan_iter(match=f"{prefix}ckpt:replay:*", count=10_000):
        fields = cast(dict[bytes, bytes], await redis.hgetall(key))
        total += sum(int(v) for k, v in fields.items() if k.startswith(b"pos|"))
    return total


async def test_replay_of_chosen_users_folds_only_their_events(live: LiveRun, redis: Redis) -> None:
    s = live.settings
    counts: dict[str, int] = {}
    for e in live.events:
        counts[e["user_id"]] = counts.get(e["user_id"], 0) + 1
    chosen = sorted(counts, key=lambda u: (-counts[u], u))[:2]
    prefix = live.prefix("r5")
    run = json_out(
        shoprec(
            s,
            "replay",
            *WHOLE_RANGE,
            "--state-prefix",
            prefix,
            "--users",
            ",".join(chosen),
            "--json",
        )
    )
    assert run["read"] == run["planned"] and run["processed"] == sum(counts[u] for u in chosen)
    users = {k async for k in redis.scan_iter(match=f"{prefix}{{u:*}}:meta")}
    assert users == {f"{prefix}{{u:{u}}}:meta".encode() for u in chosen}
    for u in chosen:
        meta = cast(dict[bytes, bytes], await redis.hgetall(f"{prefix}{{u:{u}}}:meta"))
        live_meta = cast(dict[bytes, bytes], await redis.hgetall(f"{s.state_prefix}{{u:{u}}}:meta"))
        assert meta == live_meta and int(meta[b"n"]) == counts[u]
