"""The catalogue-size benchmark's pure parts (bench/catalog_scale.py): the grown
catalogue's copies, the recall it reports, the load's records and windows."""

from __future__ import annotations

import numpy as np

from bench.catalog_scale import (
    COPY_NOISE,
    copies,
    derived_vectors,
    item_from_hash,
    items_loaded,
    load_records,
    process_label,
    recall_at_k,
    windows_of,
)
from features.catalog import item_fields
from shoprec.events import CatalogItem


def unit_rows(n: int, dim: int = 16, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((n, dim)).astype(np.float32)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def test_copies_are_unit_noisy_versions_of_the_real_rows_in_turn() -> None:
    real = unit_rows(3, dim=384)
    out = derived_vectors(real, 2, 8)
    assert out.shape == (6, 384) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    sources = np.arange(2, 8) % 3
    cos = (out * real[sources]).sum(axis=1)
    # v + 0.05·g, |g| ≈ √384: about 1/√(1 + 0.05²·384) ≈ 0.71 from the original.
    expected = 1 / np.sqrt(1 + COPY_NOISE**2 * 384)
    assert np.all(np.abs(cos - expected) < 0.08)
    # ... and nearer its own original than to the others.
    assert np.all(np.argmax(out @ real.T, axis=1) == sources)
    np.testing.assert_array_equal(out, derived_vectors(real, 2, 8))  # reproducible


def test_copies_keep_every_field_under_a_new_id() -> None:
    real = [
        CatalogItem("a", category="x > y", brand="b", price=1.5),
        CatalogItem("b", title="t", in_stock=False),
    ]
    got = copies(real, 1, 5)
    assert [c.item_id for c in got] == ["b~c0", "a~c1", "b~c1", "a~c2"]
    assert got[1].category == "x > y" and got[1].brand == "b" and got[1].price == 1.5
    assert got[0].title == "t" and got[0].in_stock is False


def test_a_stored_item_reads_back_as_the_record_that_stores_it_again() -> None:
    item = CatalogItem("i1", title="T", category="c", brand="b", price=2.25, in_stock=True, ts=7)
    vec = unit_rows(1, dim=384)[0]
    fields = item_fields(item, vec)
    raw = [fields.get(f) for f in ("title", "category", "brand", "price", "in_stock", "ts", "emb")]
    back, back_vec = item_from_hash("i1", [v.encode() if isinstance(v, str) else v for v in raw])
    assert back == item
    assert back_vec is not None
    np.testing.assert_array_equal(back_vec, vec)


def test_recall_counts_the_exact_top_k_found_and_skips_padding() -> None:
    truth = np.array([[1, 2, 3, 4], [5, 6, -1, -1], [-1, -1, -1, -1]])
    found = np.array([[4, 3, 9, 8], [6, 5, 7, -1], [1, 2, 3, 4]])
    assert recall_at_k(found, truth) == (0.5 + 1.0) / 2


def test_load_records_are_new_items_with_distinct_texts_and_their_descriptions() -> None:
    items = [
        {"item_id": "A", "title": "Card A", "description": "long text a"},
        {"item_id": "B", "title": "Card B"},  # no description: not loaded
        {"item_id": "C", "title": "Card C", "description": "long text c"},
    ]
    recs = load_records(items, 5)
    assert [r["item_id"] for r in recs] == ["A~L0", "C~L0", "A~L1", "C~L1", "A~L2"]
    assert len({r["title"] for r in recs}) == 5
    assert all(r["description"].startswith("long text") for r in recs)
    assert items[0]["item_id"] == "A"  # the source is left alone


def test_windows_split_by_due_time() -> None:
    bounds = {"before": (0.0, 10.0), "during": (10.0, 20.0), "after": (20.0, 30.0)}
    got = windows_of([1, 10, 15, 25, 40], [1.0, 2.0, 3.0, 4.0, 5.0], bounds)
    assert got == {"before": [1.0], "during": [2.0, 3.0], "after": [4.0]}


def test_triton_log_and_process_labels() -> None:
    log = (
        b"I fused_ranker v2: trained ranker on cpu, 6493 items loaded from Redis\n"
        b"I fused_ranker v2: trained ranker on cpu, 100000 items loaded from Redis\n"
    )
    assert items_loaded(log) == 100_000
    assert items_loaded(b"nothing") is None
    stub = ["/x/triton_python_backend_stub", "/repo/model_repo/fused_ranker/2/model.py", "shm"]
    assert process_label(stub) == "fused_ranker@2"
    assert process_label(["/opt/bin/tritonserver", "--model-repository=/m"]) == "tritonserver"
