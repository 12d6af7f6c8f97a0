"""The golden replay's comparison (tests/integration/golden.py): what it lets pass between
two recordings and what it reports, on hand-made lists."""

from __future__ import annotations

from typing import Any

from tests.integration.golden import MAX_CUT_FLIPS, differences


def rec(trigger: str, items: list[tuple[str, float]]) -> dict[str, Any]:
    return {
        "trigger": trigger,
        "model": "fused_ranker@2",
        "degraded": False,
        "items": [[i, s, ["similar to x"]] for i, s in items],
    }


WANT = [rec(f"t{k}", [("a", 3.0), ("b", 2.5), ("c", 2.0), ("d", 1.0)]) for k in range(10)]


def flipped(k: int) -> dict[str, Any]:
    """List ``k`` with another near-tied candidate retrieved: "e" in, the last one out."""
    return rec(f"t{k}", [("a", 3.0), ("e", 2.7), ("b", 2.5), ("c", 2.0)])


def test_a_few_lists_may_take_in_another_candidate_when_all_they_share_is_unchanged() -> None:
    got = [flipped(k) if k < MAX_CUT_FLIPS else r for k, r in enumerate(WANT)]
    assert differences(WANT, got, MAX_CUT_FLIPS) == []
    assert len(differences(WANT, got)) == MAX_CUT_FLIPS  # the strict comparison sees them


def test_more_such_lists_than_allowed_are_all_reported() -> None:
    got = [flipped(k) if k <= MAX_CUT_FLIPS else r for k, r in enumerate(WANT)]
    assert len(differences(WANT, got, MAX_CUT_FLIPS)) == MAX_CUT_FLIPS + 1


def test_a_changed_score_is_reported_with_or_without_another_candidate() -> None:
    moved = rec("t0", [("a", 3.0), ("b", 2.6), ("c", 2.0), ("d", 1.0)])
    assert differences(WANT, [moved, *WANT[1:]], MAX_CUT_FLIPS) == [
        "t0: b was (2.5, ['similar to x']), now (2.6, ['similar to x'])"
    ]
    both = rec("t0", [("a", 3.0), ("e", 2.7), ("b", 2.6), ("c", 2.0)])
    assert differences(WANT, [both, *WANT[1:]], MAX_CUT_FLIPS) == [
        "t0: items ['e'] on one side only"
    ]
