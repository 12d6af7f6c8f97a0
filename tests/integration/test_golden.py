"""The same events get the same lists, on any machine, until a change means to change them.

``golden_rees46.json`` is a recording (see ``tests/integration/golden.py`` for its
history: first of the path before retrieval, mixing, filters and the top-K moved into
Triton): the same 1,500 real rees46 events, in the same micro-batches, over the whole
rees46 catalogue, through ``fused_ranker`` v2.  Today's path must give the same lists —
the same items with the same scores (within 1e-4) and reasons — where only items of equal
score may change places, and a few lists may take in a different near-tied candidate at
the retrieval cut (another CPU's float arithmetic; ``golden.MAX_CUT_FLIPS``).
A private Redis and Triton: the shared session stack's catalogue is other tests' too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from infra.stack import Endpoints, Stack
from tests.integration import golden
from tests.integration.helpers import isolated_settings
from tests.stack import stack_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoints]:
    stack = Stack(
        stack_settings(tmp_path_factory.mktemp("golden")), model_repo=golden.REPO / "model_repo"
    )
    endpoints = stack.up(("redis", "triton"), timeout_s=300)
    try:
        yield endpoints
    finally:
        stack.down(wipe=True)


async def test_the_same_events_get_the_same_lists_as_before(
    private: Endpoints, data_dir: Path
) -> None:
    settings = isolated_settings(private, min_emit_interval_ms=0)
    got = await golden.record(settings, data_dir / "rees46-sample")
    want = orjson.loads(golden.GOLDEN.read_bytes())
    assert len(got) == len(want) > 1000
    assert golden.differences(want, got, golden.MAX_CUT_FLIPS) == []
    assert not any(r["degraded"] for r in got)
