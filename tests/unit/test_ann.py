"""The retrieval indexes: exact, and faiss IVF kept fresh by id."""

from __future__ import annotations

import threading

import numpy as np
import numpy.typing as npt
import pytest

from features.ann import ExactIndex, IvfIndex, TableIndex, exact_top_k
from features.behavioural import behavioural_vector
from features.item_table import ItemTable

DIM = 16


def unit_rows(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_ivf_with_every_list_probed_is_exact() -> None:
    x = unit_rows(2000)
    keys = np.arange(len(x))
    ivf = IvfIndex(DIM, nprobe=IvfIndex.n_lists(len(x)))
    ivf.build(x, keys)
    q = unit_rows(5, seed=1)
    got, _ = ivf.search(q, 10)
    want, _ = ExactIndex(x, keys).search(q, 10)
    assert got.tolist() == want.tolist()


def test_ivf_upsert_replaces_and_remove_forgets() -> None:
    x = unit_rows(500)
    ivf = IvfIndex(DIM, nprobe=IvfIndex.n_lists(len(x)))
    ivf.build(x, np.arange(500))
    target = unit_rows(1, seed=7)
    ivf.upsert([3, 900], np.stack([-target[0], target[0]]))
    assert ivf.search(target, 1)[0][0, 0] == 900
    assert 3 not in ivf.search(target, 500)[0][0, :-1].tolist()
    ivf.remove([900])
    assert len(ivf) == 500
    assert 900 not in ivf.search(target, 20)[0][0].tolist()


def test_repeated_key_in_one_upsert_keeps_the_last_row() -> None:
    ivf = IvfIndex(DIM, nprobe=64)
    ivf.build(unit_rows(300), np.arange(300))
    v = unit_rows(2, seed=3)
    ivf.upsert([999, 999], v)
    assert len(ivf) == 301
    found = ivf.search(v[1:], 301)[0][0].tolist()
    assert found.count(999) == 1 and found[0] == 999


@pytest.mark.parametrize("ann_min_items", [10_000, 50], ids=["exact", "ivf"])
def test_table_index_retrieves_eligible_items_and_follows_changes(ann_min_items: int) -> None:
    table = ItemTable(dim=DIM)
    x = unit_rows(200)
    nums = table.upsert([f"i{n}" for n in range(200)], x)
    index = TableIndex(table, ann_min_items)
    index.changed(table.take_changed())
    target = x[7:8]
    assert index.search(target, 1)[0][0, 0] == nums[7]
    table.upsert(["i7"], x[7:8], in_stock=[False])  # sold out: never retrieved
    table.upsert(["new"], target)
    index.changed(table.take_changed())
    found = index.search(np.concatenate([target, np.zeros((1, DIM), np.float32)]), 5)[0]
    assert found[0, 0] == table.rows(["new"])[0] and nums[7] not in found[0].tolist()
    assert (found[1] == -1).all(), "a zero query (no taste yet) retrieves nothing"


def test_background_rebuilds_serve_the_old_index_and_miss_no_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The rebuild waits for the test's word: a fast machine could otherwise finish it
    # before the test looks at what serves meanwhile.
    release = threading.Event()
    release.set()
    build = IvfIndex.build

    def held_build(
        self: IvfIndex, matrix: npt.NDArray[np.float32], keys: npt.ArrayLike, seed: int = 0
    ) -> None:
        release.wait(30)
        build(self, matrix, keys, seed)

    monkeypatch.setattr(IvfIndex, "build", held_build)
    table = ItemTable(dim=DIM)
    x = unit_rows(1200)
    nums = table.upsert([f"i{n}" for n in range(100)], x[:100])
    index = TableIndex(table, ann_min_items=50, background=True)
    index.changed(table.take_changed())
    # Crossing the threshold: the exact copy serves while the first IVF builds.
    first = index.index()
    assert isinstance(first, ExactIndex)
    index.wait_built(30)
    ivf = index.index()
    assert isinstance(ivf, IvfIndex) and len(ivf) == 100
    # Grown 4-fold: a rebuild starts in a thread, the old IVF keeps serving, new rows and all.
    release.clear()
    more = table.upsert([f"i{n}" for n in range(100, 1100)], x[100:1100])
    index.changed(table.take_changed())
    assert index.index() is ivf and len(ivf) == 1100
    # Changes while it builds: one item sold out, one new; both must reach the new index.
    table.upsert(["i3"], x[3:4], in_stock=[False])
    table.upsert(["late"], x[1100:1101])
    index.changed(table.take_changed())
    assert index.index() is ivf
    release.set()
    index.wait_built(30)
    rebuilt = index.index()
    assert isinstance(rebuilt, IvfIndex) and rebuilt is not ivf and len(rebuilt) == 1100
    late = table.rows(["late"])[0]
    assert index.search(x[1100:1101], 1)[0][0, 0] == late
    assert nums[3] not in index.search(x[3:4], 20)[0][0].tolist()
    assert more[500] in index.search(x[600:601], 5)[0][0].tolist()


def test_exact_top_k_orders_by_inner_product() -> None:
    x = unit_rows(50)
    rows, scores = exact_top_k(x, x[:2], 5)
    assert rows[:, 0].tolist() == [0, 1]
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_exact_top_k_gives_ties_to_the_lower_row_whatever_the_last_bits() -> None:
    # Items of one text share a vector; a matrix product on another CPU gives their scores
    # last-bit differences, which must not pick who makes the cut or in what order.
    rng = np.random.default_rng(3)
    matrix = rng.normal(size=(40, 8)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    twins = [5, 9, 17, 30]
    matrix[twins] = matrix[2]
    query = matrix[[2]]
    want, _ = exact_top_k(matrix, query, 3)
    assert want.tolist() == [[2, 5, 9]]
    for seed in range(5):
        jitter = np.random.default_rng(seed).normal(scale=1e-7, size=matrix.shape)
        got, scores = exact_top_k((matrix + jitter).astype(np.float32), query, 3)
        assert got.tolist() == want.tolist()
        assert np.allclose(scores, 1.0, atol=1e-5)


def test_behavioural_vector_is_the_weighted_mean_of_text_neighbours() -> None:
    a, b = np.eye(DIM, dtype=np.float32)[:2]
    vectors = {"a": a, "b": b}
    got = behavioural_vector([("a", 3.0), ("b", 1.0), ("no-text", 9.0)], vectors.get)
    assert got is not None
    np.testing.assert_allclose(got, (3 * a + b) / np.linalg.norm(3 * a + b), atol=1e-6)
    assert behavioural_vector([("no-text", 1.0)], vectors.get) is None
    assert float(np.linalg.norm(got)) == pytest.approx(1.0)


def test_behavioural_vector_survives_forward_decayed_weights() -> None:
    a, b = np.eye(DIM, dtype=np.float32)[:2]
    got = behavioural_vector([("a", 3e300), ("b", 1e300)], {"a": a, "b": b}.get)
    assert got is not None
    np.testing.assert_allclose(got, (3 * a + b) / np.linalg.norm(3 * a + b), atol=1e-6)
