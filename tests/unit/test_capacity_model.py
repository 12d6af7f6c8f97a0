"""The capacity benchmark's arithmetic: CPU per event per process from two samples, and
the model made from the runs (the measurement itself runs on the cluster)."""

from __future__ import annotations

import math
import os

from bench.capacity import capacity_model
from bench.stackwatch import Sample, StackWatch, group_cpu_seconds


def test_per_event_costs_from_two_samples() -> None:
    watch = StackWatch(groups={"broker-1": 1, "redis-1": 2, "redis-4": 3, "triton-1": 4})
    # Idle, the broker spends 0.1 of a core: 1 CPU-s of the 10 s phase is not the events'.
    watch.idle_cpu_per_s = {"broker-1": 0.1}
    before = Sample(
        {
            "broker-1": 10.0,
            "redis-1": 1.0,
            "redis-4": 0.5,
            "triton-1": 20.0,
            "worker-0": 3.0,
            "generator": 2.0,
        },
        {7001: {"evalsha": 100, "zrevrange": 50}, 7004: {"evalsha": 0}},
        {7001: 1000, 7004: 900},
        at=100.0,
    )
    after = Sample(
        {
            "broker-1": 12.0,
            "redis-1": 2.0,
            "redis-4": 1.0,
            "triton-1": 26.0,
            "worker-0": 7.0,
            "generator": 3.0,
        },
        {7001: {"evalsha": 2100, "zrevrange": 1050, "zincrby": 4000}, 7004: {"evalsha": 0}},
        {7001: 5000, 7004: 4900},
        at=110.0,
        redis_replicas={7004},
    )
    cost = watch.per_event(before, after, events=1000, ranked=500)
    assert cost["cpu_ms_per_event"]["triton-1"] == 6.0
    assert cost["cpu_ms_per_event_by_component"] == {
        "broker": 2.0,
        "generator": 1.0,
        "redis": 1.5,
        "triton": 6.0,
        "worker": 4.0,
    }
    assert cost["net_cpu_ms_per_event_by_component"]["broker"] == 1.0
    assert cost["net_cpu_ms_per_event_by_component"]["triton"] == 6.0
    assert cost["idle_cpu_cores_by_component"] == {"broker": 0.1}
    assert cost["triton_cpu_ms_per_ranked"] == 12.0
    assert cost["redis_script_calls_per_event"] == 2.0
    assert cost["redis_commands_per_event"] == 7.0  # 2000 + 1000 + 4000 over 1000 events
    assert cost["redis_commands_per_event_on_primaries"] == 7.0  # the replica ran none
    assert cost["redis_memory_bytes"] == 9900


def test_this_process_group_has_cpu_time() -> None:
    assert group_cpu_seconds(os.getpgid(0)) > 0


def run(workers: int, offered: float, reached: float, worker_ms: float) -> dict[str, object]:
    return {
        "workers": workers,
        "offered_rate": offered,
        "events_per_s": reached,
        "stack": {
            "events": 1000,
            "ranked": 800,
            "cpu_ms_per_event_by_component": {
                "worker": worker_ms,
                "redis": 0.5,
                "broker": 0.8,
                "triton": 1.6,
                "generator": 0.3,
            },
            "triton_cpu_ms_per_ranked": 2.0,
            "redis_commands_per_event": 12.0,
            "redis_script_calls_per_event": 3.0,
        },
    }


def test_the_model_from_the_runs() -> None:
    result = {
        # The light run's cost (4 ms: small batches) is not the cost at capacity.
        "runs": [run(1, 150, 149, 4.0), run(1, 600, 210, 2.5), run(2, 600, 260, 2.5)],
        "redis_state": {"bytes_per_user": 2048},
    }
    model = capacity_model(result)
    assert model["cpu_ms_per_event"]["worker"] == 2.5
    assert model["worker_events_per_s_per_core"] == 400.0
    assert model["workers_per_10k_events_per_s"] == 25
    assert model["partitions_per_input_topic_for_10k"] == 50
    assert model["capacity_events_per_s_by_workers"] == {"1": 210.0, "2": 260.0}
    assert [r["offered"] for r in model["saturated_runs"]] == [600, 600]
    assert model["triton_cpu_cores_per_10k_ranked_per_s"] == 20.0
    assert model["kafka_cores_per_10k_events_per_s"] == 8.0
    assert model["redis_cores_per_10k_events_per_s"] == 5.0
    # 2 KiB a user, on a primary and its replica: 3.81 GiB per million users.
    assert math.isclose(model["redis_gib_per_million_users"], 3.81, abs_tol=0.01)
