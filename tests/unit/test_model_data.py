"""Offline data for the ranker: no leakage of the future, online-equal features, metrics."""

from __future__ import annotations

import dataclasses
import gzip
import itertools
from pathlib import Path

import numpy as np
import orjson
import pytest

from features.decay import decayed_value, forward_weight
from features.store import COVIS_SPAN, COVIS_WINDOW_MS, UpdatePolicy
from ranking import export
from ranking.baselines import Popularity, Repeat
from ranking.data import (
    Catalogue,
    Dataset,
    Events,
    Period,
    Query,
    build_dataset,
    event_steps,
    load_catalogue,
    load_events,
    make_events,
    origin_end,
    replay,
    signals_of,
    time_cuts,
)
from ranking.evaluate import Metrics, merge_report, ranks_for_query, sample_queries
from ranking.train import TrainOptions, train_fused, version_scorer
from shoprec.errors import DatasetError
from shoprec.settings import Settings

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
REES = DATA / "rees46-sample"


@pytest.fixture(scope="module")
def rees() -> tuple[Catalogue, Events, np.ndarray]:
    """The first 3,000 real rees46 events; item vectors seeded-random (BERT is not the point)."""
    cat = load_catalogue(REES)
    ev = load_events(REES, cat)
    ev = ev.subset(slice(0, 3000))
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(cat), 384)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb[~cat.has_text] = 0.0
    return cat, ev, emb


def _cuts(ev: Events) -> tuple[int, int]:
    return int(ev.ts[2000]), int(ev.ts[2500])


@pytest.fixture(scope="module")
def full(rees: tuple[Catalogue, Events, np.ndarray]) -> list[Query]:
    cat, ev, emb = rees
    return replay(ev, cat, emb, _cuts(ev), progress=False)


def _features(q: Query) -> tuple[object, ...]:
    return (
        q.user,
        q.trigger_ts,
        q.hist_items.tolist(),
        q.hist_types.tolist(),
        q.hist_age_s.tolist(),
        q.user_emb.tolist(),
        q.signals[0].tolist(),
        q.signals[1].tolist(),
    )


def test_features_do_not_depend_on_later_events(
    rees: tuple[Catalogue, Events, np.ndarray], full: list[Query]
) -> None:
    cat, ev, emb = rees
    cut = int(ev.ts[1500])
    keep = ev.ts < cut
    part = replay(ev.subset(keep), cat, emb, _cuts(ev), progress=False)
    by_key = {(q.user, q.trigger_ts): q for q in full}
    assert len(part) > 300
    for q in part:
        assert _features(q) == _features(by_key[(q.user, q.trigger_ts)])


def test_queries_look_only_backwards(
    rees: tuple[Catalogue, Events, np.ndarray], full: list[Query]
) -> None:
    _, ev, _ = rees
    queries = full
    assert {q.period for q in queries} == {Period.TRAIN, Period.VALID, Period.TEST}
    for q in queries:
        assert q.trigger_ts < q.target_ts
        assert (q.hist_age_s >= 0).all()
        assert q.hist_items[0] in q.blocked(), "the item in view is never shown"
    # Each label is exactly the user's items at target time.
    q = queries[len(queries) // 2]
    at = (ev.user == q.user) & (ev.ts == q.target_ts)
    assert sorted(q.targets) == sorted(set(ev.item[at].tolist()))


def test_covisitation_mirrors_the_online_definition(
    rees: tuple[Catalogue, Events, np.ndarray], full: list[Query]
) -> None:
    """Recount co-visitation the way features/store.py's write path does and compare."""
    _, ev, _ = rees
    queries = full
    q = max(queries, key=lambda x: len(x.signal("covis")))
    counts: dict[int, dict[int, float]] = {}
    hist: dict[int, list[tuple[int, int]]] = {}
    upto = (ev.ts <= q.trigger_ts).sum()
    for u, i, ts in zip(
        ev.user[:upto].tolist(), ev.item[:upto].tolist(), ev.ts[:upto].tolist(), strict=True
    ):
        recent = hist.setdefault(u, [])[-5:][::-1]
        others: list[int] = []
        for o, ots in recent:
            if abs(ts - ots) <= COVIS_WINDOW_MS and o != i and o not in others:
                others.append(o)
            if len(others) >= COVIS_SPAN:
                break
        for o in others:
            w = forward_weight(ts)
            counts.setdefault(i, {})[o] = counts.get(i, {}).get(o, 0.0) + w
            counts.setdefault(o, {})[i] = counts.get(o, {}).get(i, 0.0) + w
        hist[u].append((i, ts))
    sources = list(dict.fromkeys(q.hist_items.tolist()))[:3]
    expected: dict[int, float] = {}
    for s in sources:
        for item, c in counts.get(s, {}).items():
            expected[item] = expected.get(item, 0.0) + decayed_value(c, q.trigger_ts)
    # Rows here are shorter than the 200 kept per source: the wide signal is exact.
    keys, vals = q.covis_wide
    got = dict(zip(keys.tolist(), vals.tolist(), strict=True))
    assert got.keys() == expected.keys()
    assert np.allclose([got[i] for i in expected], list(expected.values()), rtol=1e-5)
    # The online one keeps each source's 20 strongest neighbours.
    assert all(0 < v <= expected[i] * (1 + 1e-6) for i, v in q.signal("covis").items())


def _query(targets: list[int], hist: list[int], types: list[int]) -> Query:
    return Query(
        user=0,
        trigger_ts=0,
        target_ts=1,
        period=Period.TEST,
        hist_items=np.array(hist, np.int64),
        hist_types=np.array(types, np.int8),
        hist_age_s=np.zeros(len(hist), np.float32),
        user_emb=np.zeros(384, np.float32),
        signals=signals_of({}, {}, {}),
        covis_wide=(np.zeros(0, np.int64), np.zeros(0, np.float32)),
        seen=0,
        targets=targets,
    )


def test_rank_counts_every_showable_item_and_half_the_ties() -> None:
    scores = np.array([9.0, 5.0, 5.0, 5.0, 1.0, 8.0, 7.0], np.float32)
    # Item 0 is in view (blocked), 6 was bought (blocked); positives 1 and 4.
    q = _query(targets=[1, 4, 6], hist=[0, 6], types=[1, 4])
    ranks = ranks_for_query(scores, q)
    # Pool: items 2, 3, 5.  Item 1 (5.0): 5 above, 2 and 3 tie -> 1 + 1 + 1 = 3.
    assert ranks == [3.0, 4.0]
    m = Metrics()
    for r in ranks:
        m.add(r)
    m.finish()
    assert m.n == 2 and m.hr == 1.0
    assert m.ndcg == pytest.approx((1 / np.log2(4) + 1 / np.log2(5)) / 2)
    assert m.mrr == pytest.approx((1 / 3 + 1 / 4) / 2)


def test_catalogue_text_is_what_the_catalogue_agent_embeds(tmp_path: Path) -> None:
    rec = {"item_id": "7", "title": "Mug", "category": "kitchen > cups", "brand": "acme"}
    with gzip.open(tmp_path / "items.jsonl.gz", "wb") as fh:
        fh.write(orjson.dumps(rec) + b"\n" + orjson.dumps({"item_id": "8"}) + b"\n")
    cat = load_catalogue(tmp_path)
    assert cat.text == ["Mug | kitchen > cups | acme", ""]
    assert cat.has_text.tolist() == [True, False]


def test_evaluations_of_separate_processes_merge_into_one_json(
    rees: tuple[Catalogue, Events, np.ndarray], full: list[Query], tmp_path: Path
) -> None:
    cat, ev, emb = rees
    ds = Dataset("rees46-sample", cat, emb, ev, full, _cuts(ev))
    out = tmp_path / "eval.json"
    users = [3, 3, 8]
    for name, ranks in (("sasrec", [1.0, 20.0, 4.0]), ("fused", [2.0, 1.0, 1.0])):
        m = Metrics()
        for r, u in zip(ranks, users, strict=True):
            m.add(r, u)
        merge_report(out, [ds], name, m.finish(), {"epochs": 1}, {"test_sample": {"seed": 7}})
    got = orjson.loads(out.read_bytes())
    assert got["dataset"] == "rees46-sample"
    sasrec = got["models"]["sasrec"]
    assert {k: sasrec[k] for k in ("hr@10", "mrr", "n", "users")} == {
        "hr@10": 0.6667,
        "mrr": 0.4333,
        "n": 3,
        "users": 2,
    }
    lo, hi = sasrec["ndcg@10_ci95"]
    assert lo <= sasrec["ndcg@10"] <= hi
    assert got["models"]["fused"]["n"] == 3 and got["details"]["fused"] == {"epochs": 1}
    # Paired over the same users, kept per user so separate processes still pair up.
    assert got["per_user"]["users"] == [3, 8] and got["per_user"]["positives"] == [2, 1]
    gain = got["versus_fused"]["sasrec"]
    assert gain["value"] == pytest.approx(
        got["models"]["fused"]["ndcg@10"] - sasrec["ndcg@10"], abs=2e-4
    )
    assert gain["ci95"][0] <= gain["value"] <= gain["ci95"][1]
    assert list(tmp_path.iterdir()) == [out]


def test_any_served_version_can_be_judged_on_a_shops_data(
    rees: tuple[Catalogue, Events, np.ndarray], full: list[Query]
) -> None:
    """The learner compares a candidate with whatever is live: version 1's fixed fusion or
    a trained artefact, its behavioural rows matched to this shop's items by id."""
    cat, ev, emb = rees
    ds = Dataset("rees46-sample", cat, emb, ev, full, _cuts(ev))
    repo = Path(__file__).resolve().parents[2] / "model_repo" / "fused_ranker"
    queries = [q for q in full if q.period == Period.TEST][:3]
    fixed, about = version_scorer(repo / "1", ds)
    assert about == "fixed fusion"
    trained, about = version_scorer(repo / "2", ds)
    assert about == "trained on rees46-sample"
    for scorer in (fixed, trained):
        scores = scorer(queries)
        assert scores.shape == (3, len(cat)) and np.isfinite(scores).all()
    # Items the artefact learned keep their rows; the rest get row 0 (unknown).
    known = export.load(repo / "2").item_rows()
    rows = trained.tables.rows.tolist()  # type: ignore[attr-defined]
    assert all(rows[i] == known.get(item, 0) for i, item in enumerate(cat.ids))
    assert any(rows)


def test_replay_retrieval_gives_tied_items_to_the_lower_row_as_the_worker_does(
    rees: tuple[Catalogue, Events, np.ndarray],
) -> None:
    # Arrange: every item with text takes one of ten vectors, so items tie by hundreds
    # (as items of one text do), and a user's 50 nearest cut through a tied group.
    cat, ev, emb = rees
    text_rows = np.flatnonzero(cat.has_text)
    group = np.full(len(cat), -1)
    group[text_rows] = np.arange(text_rows.size) % 10
    tied = np.where(cat.has_text[:, None], emb[text_rows[:10]][group % 10], 0.0)

    queries = replay(
        ev.subset(slice(0, 1500)), cat, tied.astype(np.float32), _cuts(ev), progress=False
    )

    # Assert: of each group, a list holds the group's lowest rows (features.ann.exact_top_k's
    # rule, which the worker's index follows), whatever the matrix product's last bits.
    checked = 0
    for q in queries:
        found = np.array(sorted(q.signal("retrieval")), np.int64)
        for g in set(group[found].tolist()) - {-1}:
            mine = found[group[found] == g]
            assert mine.tolist() == text_rows[group[text_rows] == g][: mine.size].tolist()
            checked += 1
    assert checked > 500


def test_one_event_per_step_labels_each_event_with_the_users_next_event() -> None:
    """``step="event"`` (the learner's check on what the stream serves): each event of a
    user but the last is a trigger, labelled with that user's next event alone, and sees
    nothing after itself, not even the rest of a same-day basket (amazon has many)."""
    folder = DATA / "amazon-gift-cards-2018"
    cat = load_catalogue(folder)
    ev = load_events(folder, cat)
    emb = np.zeros((len(cat), 384), np.float32)
    cuts = _cuts(ev)
    steps = replay(ev, cat, emb, cuts, progress=False, step="event")
    baskets = replay(ev, cat, emb, cuts, progress=False)
    mine: dict[int, list[int]] = {}
    for k, u in enumerate(ev.user.tolist()):
        mine.setdefault(u, []).append(k)
    assert len(steps) == sum(len(ks) - 1 for ks in mine.values())
    assert len(steps) > len(baskets) + 500, "same-day events are one basket step"
    got: dict[int, list[tuple[int, list[int], int]]] = {}
    for q in steps:
        got.setdefault(q.user, []).append((int(q.hist_items[0]), q.targets, len(q.hist_items)))
    for u, ks in mine.items():
        want = [
            (int(ev.item[a]), [int(ev.item[b])], min(j + 1, 50))
            for j, (a, b) in enumerate(itertools.pairwise(ks))
        ]
        assert got.get(u, []) == want
    # Only the held-out slice's labels (what the learner asks for): the same queries, with
    # the snapshots of every other step skipped.
    test = replay(ev, cat, emb, cuts, progress=False, step="event", labels_in=Period.TEST)
    assert test and all(q.period == Period.TEST for q in test)
    assert [(*_features(q), q.targets) for q in test] == [
        (*_features(q), q.targets) for q in steps if q.period == Period.TEST
    ]


def test_the_learner_folds_a_shops_events_as_its_worker_does(
    rees: tuple[Catalogue, Events, np.ndarray], full: list[Query]
) -> None:
    """A shop with SHOPREC_HISTORY_LEN=5 and SHOPREC_MEMORY_LEN=0 trains on what its
    worker reads (``UpdatePolicy.of``, as ``ops.learn.dataset_of`` builds it), and gets a
    model that reads no memory; under the defaults (``full``) both are there."""
    cat, ev, emb = rees
    policy = UpdatePolicy.of(Settings(history_len=5, memory_len=0))
    ds = build_dataset("rees46", cat, ev, emb, progress=False, policy=policy)
    assert max(q.hist_items.size for q in ds.queries) == 5
    assert not any(q.memory[0].size for q in ds.queries)
    assert max(q.hist_items.size for q in full) > 5
    assert any(q.memory[0].size for q in full)
    model, _, _ = train_fused(ds, dataclasses.replace(TrainOptions(), max_epochs=0), False)
    assert TrainOptions().model.memory and not model.memory


def test_the_same_events_read_in_another_order_number_their_users_alike() -> None:
    """Read from a topic's partitions, a shop's events come in no fixed order; the user
    numbers (which the bootstrap over users draws by) follow the events' replay order."""
    folder = DATA / "amazon-gift-cards-2018"
    with gzip.open(folder / "events.jsonl.gz") as fh:
        recs = [orjson.loads(line) for line in fh]
    rows = [(r["event_id"], r["type"], r["user_id"], r["item_id"], r["ts"]) for r in recs]
    shuffled = [rows[i] for i in np.random.default_rng(1).permutation(len(rows))]
    a = make_events(rows, load_catalogue(folder))
    b = make_events(shuffled, load_catalogue(folder))
    assert a.user_ids == b.user_ids and a.user_ids != list(dict.fromkeys(r[2] for r in rows))
    assert a.user.tolist() == b.user.tolist() and a.event_ids == b.event_ids


def test_rolling_origins_test_back_to_back_on_data_that_ends_at_their_test_period(
    rees: tuple[Catalogue, Events, np.ndarray],
) -> None:
    cat, ev, emb = rees
    latest, earlier = (build_dataset("r", cat, ev, emb, progress=False, origin=k) for k in (0, 1))
    assert latest.cut_ts == time_cuts(ev.ts, 0.1, 0.1)
    # Origin 1's test period ends where origin 0's begins, and it never sees those events.
    end = origin_end(ev.ts, 0.1, 1)
    assert end == latest.cut_ts[1] and earlier.cut_ts[1] < end
    assert int(earlier.events.ts.max()) < end <= int(latest.events.ts.max())
    assert len(earlier.events) == int((ev.ts < end).sum())
    test = earlier.period(Period.TEST)
    assert test and all(earlier.cut_ts[1] <= q.target_ts < end for q in test)
    assert all(q.trigger_ts < end for q in earlier.queries)
    # A user keeps one number at every origin (the intervals resample users across them).
    assert earlier.events.user_ids == latest.events.user_ids
    with pytest.raises(DatasetError, match="origin 8"):
        time_cuts(ev.ts, 0.1, 0.1, origin=8)


def test_pooled_origins_keep_every_positive_and_pair_users_across_them() -> None:
    a, b = Metrics(skipped=1), Metrics(skipped=2)
    for m, ranks, users in ((a, [1.0, 3.0], [5, 6]), (b, [2.0, 40.0], [5, 9])):
        for r, u in zip(ranks, users, strict=True):
            m.add(r, u)
        m.finish()
    pooled = Metrics.pooled([a, b])
    assert (pooled.n, pooled.skipped, pooled.ranks) == (4, 3, [1.0, 3.0, 2.0, 40.0])
    assert pooled.hr == 0.75 and pooled.mrr == pytest.approx((1 + 1 / 3 + 1 / 2 + 1 / 40) / 4)
    users, gains, counts = pooled.per_user()
    assert users.tolist() == [5, 6, 9] and counts.tolist() == [2.0, 1.0, 1.0]
    assert gains[0] == pytest.approx(1.0 + 1.0 / np.log2(3.0))


def test_a_report_of_other_origins_starts_afresh(
    rees: tuple[Catalogue, Events, np.ndarray], tmp_path: Path
) -> None:
    cat, ev, emb = rees
    origins = [build_dataset("r", cat, ev, emb, progress=False, origin=k) for k in (0, 1)]
    out = tmp_path / "eval.json"
    m = Metrics()
    m.add(1.0, 3)
    merge_report(out, origins, "covisitation", m.finish(), {}, {})
    merge_report(out, origins, "fused", m, {}, {})
    got = orjson.loads(out.read_bytes())
    assert [o["test_from_ts"] for o in got["origins"]] == [d.cut_ts[1] for d in origins]
    assert got["split"] == got["origins"][0] and set(got["models"]) == {"covisitation", "fused"}
    merge_report(out, origins[:1], "fused", m, {}, {})  # one origin: other periods
    assert set(orjson.loads(out.read_bytes())["models"]) == {"fused"}


def test_baselines_count_what_a_one_event_step_has_seen_not_its_label() -> None:
    """Amazon's timestamps are days: a user's next event is often one of the same day.  In a
    one-event step the baselines must not count it (counting by time would)."""
    folder = DATA / "amazon-gift-cards-2018"
    cat = load_catalogue(folder)
    ev = load_events(folder, cat)
    ds = build_dataset("amazon", cat, ev, np.zeros((len(cat), 384), np.float32), progress=False)
    same_day = [q for q in event_steps(ds, Period.TEST) if q.target_ts == q.trigger_ts]
    assert len(same_day) > 50
    pop = Popularity(ds, None)
    repeat = Repeat(ds, pop, None)
    for q in same_day:
        label = np.flatnonzero(
            (ev.user == q.user) & (ev.item == q.targets[0]) & (ev.ts == q.target_ts)
        )
        assert label.min() >= q.seen  # the label comes after what the state has taken
        assert pop.counts(q).sum() == pytest.approx(pop.w[: q.seen].sum())
        own = np.flatnonzero(ev.user[: q.seen] == q.user)
        assert repeat.counts(q).sum() == pytest.approx(pop.w[own].sum())


def test_the_one_event_replay_samples_before_replaying_the_queries_it_would_sample_after() -> None:
    """``event_steps(limit=)`` snapshots only the sampled steps (the judgement's time), and
    they must be the very queries ``sample_queries`` keeps of the full replay: the same
    users, triggers, labels and state, in the same order."""
    folder = DATA / "otto-sample"
    cat = load_catalogue(folder)
    ds = build_dataset(
        "otto", cat, load_events(folder, cat), np.zeros((len(cat), 384), np.float32), progress=False
    )
    full = event_steps(ds, Period.TEST)

    def seen(qs: list[Query]) -> list[tuple[object, ...]]:
        return [
            (
                q.user,
                q.trigger_ts,
                q.target_ts,
                q.targets,
                q.seen,
                q.hist_items.tolist(),
                q.signals[1].tolist(),
            )
            for q in qs
        ]

    for limit in (10, 40, len(full), None):
        sampled = event_steps(ds, Period.TEST, limit=limit, seed=7)
        assert seen(sampled) == seen(sample_queries(full, limit, 7))
    assert len(event_steps(ds, Period.TEST, limit=10, seed=7)) == 10 < len(full)
    with pytest.raises(ValueError, match="step='event'"):
        replay(ds.events, cat, ds.item_emb, ds.cut_ts, only=frozenset({0}))


def test_a_querys_signals_are_looked_up_by_item_with_zeros_where_it_has_none() -> None:
    signals = signals_of({5: 2.0}, {1: 0.5, 5: 0.25}, {9: -0.1})
    q = dataclasses.replace(_query([1], [2], [0]), signals=signals)
    assert signals[0].tolist() == [1, 5, 9]
    got = q.signals_at(np.array([9, 0, 5, 12, 1], np.int64))
    want = [[0, 0, -0.1], [0, 0, 0], [2.0, 0.25, 0], [0, 0, 0], [0, 0.5, 0]]
    assert np.allclose(got, np.array(want, np.float32))
    assert q.signal("popularity") == {1: 0.5, 5: 0.25} and q.signal("covis") == {5: 2.0}
    assert q.dense_signals(10)[5].tolist() == [2.0, 0.25, 0.0]
    empty = dataclasses.replace(q, signals=signals_of({}, {}, {}))
    assert empty.signals_at(np.array([3], np.int64)).tolist() == [[0, 0, 0]]
