"""The retrieval indexes: exact, and faiss IVF kept fresh by id."""

from __future__ import annotations

import numpy as np
import pytest

from features.ann import ExactIndex, IvfIndex, exact_top_k
from features.behavioural import behavioural_vector

DIM = 16


def unit_rows(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_ivf_with_every_list_probed_is_exact() -> None:
    x = unit_rows(2000)
    ids = [f"i{n}" for n in range(len(x))]
    ivf = IvfIndex(DIM, nprobe=IvfIndex.n_lists(len(x)))
    ivf.build(x, ids)
    q = unit_rows(5, seed=1)
    got = [[i for i, _ in row] for row in ivf.search(q, 10)]
    want = [[i for i, _ in row] for row in ExactIndex(x, ids).search(q, 10)]
    assert got == want


def test_ivf_upsert_replaces_and_remove_forgets() -> None:
    x = unit_rows(500)
    ids = [f"i{n}" for n in range(len(x))]
    ivf = IvfIndex(DIM, nprobe=IvfIndex.n_lists(len(x)))
    ivf.build(x, ids)
    target = unit_rows(1, seed=7)
    ivf.upsert(["i3", "new"], np.stack([-target[0], target[0]]))
    assert ivf.search(target, 1)[0][0][0] == "new"
    assert "i3" not in [i for i, _ in ivf.search(target, 500)[0][:-1]]
    ivf.remove(["new"])
    assert len(ivf) == 500
    assert all(i != "new" for i, _ in ivf.search(target, 20)[0])


def test_repeated_id_in_one_upsert_keeps_the_last_row() -> None:
    ivf = IvfIndex(DIM, nprobe=64)
    ivf.build(unit_rows(300), [f"i{n}" for n in range(300)])
    v = unit_rows(2, seed=3)
    ivf.upsert(["dup", "dup"], v)
    assert len(ivf) == 301
    found = [i for i, _ in ivf.search(v[1:], 301)[0]]
    assert found.count("dup") == 1 and found[0] == "dup"


def test_exact_top_k_orders_by_inner_product() -> None:
    x = unit_rows(50)
    rows, scores = exact_top_k(x, x[:2], 5)
    assert rows[:, 0].tolist() == [0, 1]
    assert np.all(np.diff(scores, axis=1) <= 0)


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
