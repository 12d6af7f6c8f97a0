"""Learning per shop without services: event order, confidence intervals, the promotion
rule, the version folders, the learner's metrics."""

from __future__ import annotations

import gzip
import json
import logging
import re
import threading
from pathlib import Path

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ops.learn import (
    ComplementsChoice,
    LearnOptions,
    cold_baselines,
    decide,
    is_own,
    latest_catalogue,
    next_event_and_complements,
    shop_id,
)
from ops.learner import RETRY_S, LearnerCollector, LearnerState, Trigger
from ops.produce import in_event_order
from ops.versions import INCOMING, Versions, triton_endpoints
from ranking.data import Period, Query, load_catalogue, load_events, signals_of
from ranking.evaluate import (
    Metrics,
    evaluate_scorer,
    evaluate_views,
    paired_difference,
    served_with_complements,
    with_complements,
)
from shoprec.errors import ConfigError, Interrupted
from shoprec.events import EventType, Limits, tie_break
from shoprec.settings import Settings

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


# --- same-timestamp events ------------------------------------------------------------------


def test_same_timestamp_events_are_ordered_by_a_hash_of_their_id_not_the_file() -> None:
    """The amazon file lists a user's same-day reviews by item id; the replay must not."""
    folder = DATA / "amazon-gift-cards-2018"
    cat = load_catalogue(folder)
    by_hash = load_events(folder, cat)
    by_file = load_events(folder, load_catalogue(folder), order="file")
    assert len(by_hash) == len(by_file) and (by_hash.ts == by_file.ts).all()
    for k in range(1, len(by_hash)):
        if by_hash.ts[k] == by_hash.ts[k - 1]:
            assert tie_break(by_hash.event_ids[k - 1]) < tie_break(by_hash.event_ids[k])
    assert by_hash.event_ids != by_file.event_ids
    # Within a shared day, file order is item-id order for one user; hash order is not.
    in_file = _same_user_same_day_pairs(by_file, cat.ids)
    in_hash = _same_user_same_day_pairs(by_hash, cat.ids)
    assert in_file and all(a < b for a, b in in_file)
    assert not all(a < b for a, b in in_hash)


def _same_user_same_day_pairs(ev: object, ids: list[str]) -> list[tuple[str, str]]:
    out = []
    user, item, ts = ev.user, ev.item, ev.ts  # type: ignore[attr-defined]
    for k in range(1, len(ts)):
        if ts[k] == ts[k - 1] and user[k] == user[k - 1]:
            out.append((ids[item[k - 1]], ids[item[k]]))
    return out


def test_produce_sends_a_timestamp_run_in_hash_order_and_keeps_time_order() -> None:
    with gzip.open(DATA / "amazon-gift-cards-2018" / "events.jsonl.gz", "rb") as fh:
        events = [orjson.loads(line) for line in fh]
    sent = list(in_event_order(events))
    assert sorted(e["event_id"] for e in sent) == sorted(e["event_id"] for e in events)
    assert [e["ts"] for e in sent] == sorted(e["ts"] for e in events)
    keys = [(e["ts"], tie_break(e["event_id"])) for e in sent]
    assert keys == sorted(keys)


def test_the_catalogue_read_back_numbers_items_by_id_whatever_order_they_arrive_in() -> None:
    """The learner's item rows must not depend on when each catalogue record was sent."""
    with gzip.open(DATA / "amazon-gift-cards-2018" / "items.jsonl.gz", "rb") as fh:
        items = [orjson.loads(line) for line in fh][:300]
    records = [(str(i["item_id"]).encode(), orjson.dumps(i)) for i in items]
    gone = records[7][0]
    records += [(gone, None), (b"x", b"not json"), (records[3][0], orjson.dumps(items[3]))]
    limits = Limits()
    cat, bad = latest_catalogue(records, limits)
    shuffled = [records[k] for k in np.random.default_rng(1).permutation(len(records) - 3)]
    # The same records in another arrival order (the tombstone and the repeat kept last).
    again, _ = latest_catalogue(shuffled + records[-3:], limits)
    assert bad == 1 and len(cat) == len(items) - 1 and gone.decode() not in cat.ids
    assert cat.ids == sorted(cat.ids) and again.ids == cat.ids and again.text == cat.text
    assert again.category == cat.category


# --- intervals and the promotion rule ------------------------------------------------------


def _metrics(ranks: list[float], users: list[int]) -> Metrics:
    m = Metrics()
    for r, u in zip(ranks, users, strict=True):
        m.add(r, u)
    return m.finish()


def test_intervals_resample_users_and_pair_two_models() -> None:
    rng = np.random.default_rng(0)
    users = rng.integers(0, 300, 2000).tolist()
    base = rng.integers(1, 40, 2000).astype(float)
    better = np.maximum(base - 3, 1)  # every positive ranked 3 places higher
    a, b = _metrics(better.tolist(), users), _metrics(base.tolist(), users)
    ci = b.ci()
    assert ci.lo < b.ndcg < ci.hi and ci.hi - ci.lo < 0.05
    gain = paired_difference(a, b)
    assert gain.value == pytest.approx(a.ndcg - b.ndcg)
    # Paired, the shared noise cancels: the gain's interval is narrower than either model's.
    assert 0 < gain.lo < gain.value < gain.hi and gain.hi - gain.lo < ci.hi - ci.lo
    assert paired_difference(b, b).bounds == (0.0, 0.0)
    with pytest.raises(ValueError, match="same positives"):
        paired_difference(a, _metrics([1.0], [0]))


def test_a_cold_shop_gets_the_untrained_baselines_and_a_warmer_one_is_trained(
    tmp_path: Path,
) -> None:
    """otto-sample's validation period has 4 users: too few to tell a learned model from the
    baselines, so none is trained, and the shop keeps the baseline its validation ranks
    higher; with the threshold at 4 the same shop is trained."""
    from dataclasses import replace

    from ranking.data import load_dataset
    from ranking.train import OWN_ITEMS_FIRST, TrainOptions, train_fused

    ds = load_dataset(DATA / "otto-sample", cache_dir=tmp_path, progress=False)
    options = TrainOptions(max_epochs=1, seed=7)
    _, _, cold = train_fused(ds, options, progress=False)
    assert cold["valid_users"] < options.min_validation_users
    assert cold["cold_shop"] and cold["kept"] == "baselines" and cold["best_epoch"] == -1
    assert [h["epoch"] for h in cold["history"]] == [-1], "no epoch was run"
    # Its validation ranks co-visitation a little above the user's own items first here...
    starts = cold["valid_ndcg@10_starts"]
    assert starts["baselines"] > starts[OWN_ITEMS_FIRST] > 0
    assert cold["valid_ndcg@10"] == starts["baselines"]
    # ...and far below it one origin earlier (sessions that go back to what they saw):
    # that shop starts, untrained, from its own items first.
    earlier = load_dataset(DATA / "otto-sample", cache_dir=tmp_path, progress=False, origin=1)
    _, _, back = train_fused(earlier, options, progress=False)
    starts = back["valid_ndcg@10_starts"]
    assert back["cold_shop"] and back["kept"] == OWN_ITEMS_FIRST and back["best_epoch"] == -1
    assert back["valid_ndcg@10"] == starts[OWN_ITEMS_FIRST] > starts["baselines"]
    warm_options = replace(options, min_validation_users=cold["valid_users"])
    _, _, warm = train_fused(ds, warm_options, progress=False)
    assert not warm["cold_shop"]
    assert [h["epoch"] for h in warm["history"]] == [-1, 0]
    assert list(warm["valid_ndcg@10_starts"]) == ["baselines"], "trained: learns the weights"


def test_early_stopping_neither_keeps_nor_stops_before_min_steps(tmp_path: Path) -> None:
    """A small shop's epoch is a few optimiser steps: no epoch is kept, and training does
    not stop, before ``min_steps`` steps are behind it; where ``max_epochs`` never gets
    there, the last epoch is the first that may be kept."""
    from ranking.data import load_dataset
    from ranking.train import TrainOptions, train_fused

    ds = load_dataset(DATA / "otto-sample", cache_dir=tmp_path, progress=False)
    # otto-sample trains here once its 4 validation users are enough; patience 1 would
    # stop at the first epoch without gain.
    options = TrainOptions(max_epochs=6, patience=1, seed=7, min_validation_users=4)
    per_epoch = -(-len(ds.period(Period.TRAIN)) // options.batch)
    assert per_epoch < options.min_steps, "the warm-up spans several epochs here"
    warm = -(-options.min_steps // per_epoch) - 1  # the first epoch past min_steps
    _, _, got = train_fused(ds, options, progress=False)
    epochs = [h["epoch"] for h in got["history"]]
    assert epochs[: warm + 2] == list(range(-1, warm + 1)), got["history"]
    assert got["steps"] == per_epoch * (len(epochs) - 1)
    assert got["best_epoch"] == -1 or got["best_epoch"] >= warm, got["history"]
    never = TrainOptions(max_epochs=2, seed=7, min_validation_users=4, min_steps=10**6)
    _, _, short = train_fused(ds, never, progress=False)
    assert [h["epoch"] for h in short["history"]] == [-1, 0, 1]
    assert short["best_epoch"] in (-1, 1), "the last epoch, or the baselines"


def test_a_worse_candidate_is_never_promoted() -> None:
    users = list(range(200)) * 3
    live = _metrics([2.0] * 600, users)
    worse = _metrics([3.0] * 600, users)
    d = decide(worse, live, margin=0.0)
    assert not d.promote and "worse" in d.reason


def test_only_a_confident_gain_promotes_whoever_trained_the_live_model() -> None:
    rng = np.random.default_rng(1)
    users = rng.integers(0, 400, 1500).tolist()
    live_ranks = rng.integers(1, 30, 1500).astype(float)
    live = _metrics(live_ranks.tolist(), users)
    # Different per positive and a little better on average: no evidence of a gain.
    shuffled = rng.permutation(live_ranks)
    shuffled[:60] = np.maximum(shuffled[:60] - 1, 1)
    slightly = _metrics(shuffled.tolist(), users)
    clearly = _metrics(np.maximum(live_ranks - 4, 1).tolist(), users)
    unsure = decide(slightly, live, 0.01)
    assert slightly.ndcg > live.ndcg and not unsure.promote
    assert unsure.gain is not None and unsure.gain.lo < 0 < unsure.gain.value
    assert "not better with confidence" in unsure.reason
    assert decide(clearly, live, 0.01).promote
    # Equal quality keeps the live model, the shipped one (or another shop's) included.
    tie = decide(_metrics(live_ranks.tolist(), users), live, 0.01)
    assert not tie.promote and "not better with confidence" in tie.reason
    assert decide(clearly, None, 0.01).promote


def test_a_confident_gain_on_baskets_is_not_promoted_if_lower_on_the_next_event() -> None:
    rng = np.random.default_rng(2)
    users = rng.integers(0, 400, 1500).tolist()
    live_ranks = rng.integers(1, 30, 1500).astype(float)
    live = _metrics(live_ranks.tolist(), users)
    clearly = _metrics(np.maximum(live_ranks - 4, 1).tolist(), users)
    worse_next = _metrics((live_ranks + 4).tolist(), users)
    d = decide(clearly, live, 0.01, (worse_next, live))
    assert not d.promote and "worse than the live version on the next event" in d.reason
    assert d.gain is not None and d.gain.lo > 0, "the basket-step gain is still reported"
    # Lower on the next event without confidence still keeps the live version.
    slightly_worse = live_ranks.copy()
    slightly_worse[:30] += 1
    d = decide(clearly, live, 0.01, (_metrics(slightly_worse.tolist(), users), live))
    assert not d.promote and "on the next event" in d.reason
    # Not lower on the next event: the basket-step rule decides.
    assert decide(clearly, live, 0.01, (live, live)).promote
    assert decide(clearly, live, 0.01, (clearly, live)).promote


def test_a_fresher_own_round_replaces_the_shops_earlier_one_when_no_lower() -> None:
    rng = np.random.default_rng(3)
    users = rng.integers(0, 400, 1500).tolist()
    live_ranks = rng.integers(1, 30, 1500).astype(float)
    live = _metrics(live_ranks.tolist(), users)
    tie = _metrics(live_ranks.tolist(), users)
    # A tie keeps a foreign live model (the shipped one) and replaces the shop's own round.
    assert not decide(tie, live, 0.01).promote
    d = decide(tie, live, 0.01, (live, live), refresh=True)
    assert d.promote and "fresher round of this shop's own model" in d.reason
    # Lower on either slice keeps even the shop's own earlier round.
    worse_ranks = live_ranks.copy()
    worse_ranks[:30] += 1
    worse = _metrics(worse_ranks.tolist(), users)
    assert not decide(worse, live, 0.01, refresh=True).promote
    d = decide(tie, live, 0.01, (worse, live), refresh=True)
    assert not d.promote and "on the next event" in d.reason
    # A confident gain says so, own round or not.
    clearly = _metrics(np.maximum(live_ranks - 4, 1).tolist(), users)
    assert "better than the live version" in decide(clearly, live, 0.01, refresh=True).reason


def test_a_cold_shops_baselines_replace_another_shops_weights_when_no_lower() -> None:
    """A cold shop starts from its own baselines, not from another shop's weights: a tie
    with the shipped version is enough, a loss on either slice is not."""
    rng = np.random.default_rng(4)
    users = rng.integers(0, 12, 60).tolist()  # a cold shop's few held-out users
    live_ranks = rng.integers(1, 30, 60).astype(float)
    live = _metrics(live_ranks.tolist(), users)
    tie = _metrics(live_ranks.tolist(), users)
    assert not decide(tie, live, 0.01, (live, live)).promote, "a trained candidate: kept"
    d = decide(tie, live, 0.01, (live, live), baselines=True)
    assert d.promote and "a cold shop's own baselines instead of" in d.reason
    worse_ranks = live_ranks.copy()
    worse_ranks[:5] += 2
    worse = _metrics(worse_ranks.tolist(), users)
    d = decide(worse, live, 0.01, (live, live), baselines=True)
    assert not d.promote and "worse than the live version on the held-out slice" in d.reason
    d = decide(tie, live, 0.01, (worse, live), baselines=True)
    assert not d.promote and "on the next event" in d.reason


def test_only_an_untrained_cold_shops_report_counts_as_its_baselines() -> None:
    assert cold_baselines({"cold_shop": True, "kept": "baselines"})
    assert cold_baselines({"cold_shop": True, "kept": "baselines, own items first"})
    assert not cold_baselines({"cold_shop": False, "kept": "baselines"}), "a warm shop's"
    assert not cold_baselines({"cold_shop": False, "kept": "trained"})
    assert not cold_baselines({}), "a report from before the cold-shop rule"


def test_the_settings_give_the_promotion_rule() -> None:
    settings = Settings(_env_file=None, learner_margin=0.05, learner_refresh=False)
    options = LearnOptions(max_test_queries=10).judged_as(settings)
    assert (options.margin, options.refresh, options.max_test_queries) == (0.05, False, 10)
    assert LearnOptions().judged_as(Settings(_env_file=None)).refresh, "on by default"


# --- complements after a purchase -------------------------------------------------------------


N_ITEMS = 8
RANKER = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2], np.float32)
"""A ranker that orders the items 0, 1, 2, ... for everyone."""


def _step(user: int, target: int, bought_with: list[int], just_bought: int = 7) -> Query:
    """A user right after buying ``just_bought`` (which the worker never lists again)."""
    empty = np.zeros(0, np.float32)
    return Query(
        user=user,
        trigger_ts=0,
        target_ts=1,
        period=Period.TEST,
        hist_items=np.array([just_bought], np.int64),
        hist_types=np.array([EventType.PURCHASE], np.int8),
        hist_age_s=np.zeros(1, np.float32),
        user_emb=np.zeros(4, np.float32),
        signals=signals_of({}, {}, {}),
        covis_wide=(np.zeros(0, np.int64), empty),
        seen=0,
        targets=[target],
        bought_with=np.array(bought_with, np.int64),
    )


def _ranker(queries: list[Query]) -> np.ndarray:
    return np.tile(RANKER, (len(queries), 1))


def test_complements_take_the_odd_places_of_the_served_order() -> None:
    # Complements 7 (just bought: never listed), 5, 3: the ranker's 0, then 5, 1, 3, 2, ...
    q = _step(0, 2, [7, 5, 3])
    order = np.argsort(-served_with_complements(_ranker, 10)([q])[0], kind="stable").tolist()
    assert order[:6] == [0, 5, 1, 3, 2, 4]
    one = np.argsort(-served_with_complements(_ranker, 1)([q])[0], kind="stable").tolist()
    assert one[:4] == [0, 5, 1, 2], "at most n complements"
    assert np.argsort(-served_with_complements(_ranker, 0)([q])[0]).tolist()[:3] == [0, 1, 2]
    # In the ranker's order: 3 (its fourth) before 5 (its sixth).
    ranked = served_with_complements(_ranker, 10, "ranker")([q])[0]
    assert np.argsort(-ranked, kind="stable").tolist()[:6] == [0, 3, 1, 5, 2, 4]
    ranks = [
        evaluate_scorer(served_with_complements(_ranker, n), [q], progress=False).ranks
        for n in (0, 10)
    ]
    assert ranks == [[3.0], [5.0]], "item 2: the ranker's third, shown fifth"
    # Both served orders from one pass of the ranker: the same ranks.
    views = {str(n): (with_complements(n), None) for n in (0, 10)}
    assert [m.ranks for m in evaluate_views(_ranker, [q], views).values()] == ranks


def test_the_learner_drops_complements_only_when_they_lower_the_next_event_with_confidence() -> (
    None
):
    users = range(200)

    def choose_complements(steps: list[Query], setting: int) -> ComplementsChoice:
        choice = next_event_and_complements(_ranker, steps, setting)[1]
        assert choice is not None
        return choice

    # The next event is the ranker's second pick: complements push it from 2nd to 3rd place.
    lowered = [_step(u, 1, [5, 6]) for u in users]
    choice = choose_complements(lowered, 10)
    assert choice.served == 0 and "lower this version's lists" in choice.reason
    assert choice.gain is not None and choice.gain.hi < 0
    # The next event is a complement the ranker puts last: complements raise it.
    raised = [_step(u, 6, [6, 5]) for u in users]
    choice = choose_complements(raised, 10)
    assert choice.served == 10 and choice.gain is not None and choice.gain.lo > 0
    # Co-purchase order lists 6 first; the ranker's order would list 5 first.
    assert choice.order == "co-purchase"
    assert choice.order_gain is not None and choice.order_gain.value < 0
    # The next event is the complement the ranker scores higher but co-purchase lists
    # second: the ranker's order serves it second (after the ranker's best), not fourth.
    by_ranker = choose_complements([_step(u, 3, [5, 3]) for u in users], 10)
    assert by_ranker.served == 10 and by_ranker.order == "ranker", by_ranker
    assert by_ranker.order_gain is not None and by_ranker.order_gain.lo > 0
    assert "in ranker order" in by_ranker.reason
    got = by_ranker.to_json()["ndcg@10"]
    assert got["ranker"] > got["without"] and got["ranker"] > got["co-purchase"], got
    # Half of each: lower on some users, higher on others, no confident loss: kept.
    mixed = lowered[:100] + raised[100:]
    assert choose_complements(mixed, 10).served == 10
    # The same pass gives the ranker's own order on every step.
    own = next_event_and_complements(_ranker, mixed, 10)[0]
    assert own.ranks == evaluate_scorer(_ranker, mixed, progress=False).ranks
    assert next_event_and_complements(_ranker, mixed, None)[1] is None
    # Nothing to judge on, or nothing asked for.
    none = [_step(u, 1, []) for u in users]
    assert choose_complements(none, 10).served == 10
    assert "no held-out step" in choose_complements(none, 10).reason
    assert choose_complements(lowered, 0).served == 0


def test_the_settings_say_whether_the_learner_chooses_complements() -> None:
    assert LearnOptions().judged_as(Settings(_env_file=None)).complements == 10
    settings = Settings(_env_file=None, complements_after_purchase=4)
    assert LearnOptions().judged_as(settings).complements == 4
    off = Settings(_env_file=None, learner_complements=False)
    assert LearnOptions().judged_as(off).complements is None


def test_the_replay_keeps_what_was_bought_with_the_basket_after_a_purchase_only(
    tmp_path: Path,
) -> None:
    """Real events: amazon (every event a purchase) and otto (ten purchases)."""
    from ranking.data import load_dataset

    for name in ("amazon-gift-cards-2018", "otto-sample"):
        ds = load_dataset(DATA / name, cache_dir=tmp_path, progress=False)
        with_complements = [q for q in ds.queries if q.bought_with.size]
        assert all(q.hist_types[0] == EventType.PURCHASE for q in with_complements), name
        assert all(len(set(q.bought_with.tolist())) == q.bought_with.size for q in ds.queries)
        if name.startswith("amazon"):
            assert len(with_complements) > len(ds.queries) // 4, len(with_complements)


def test_only_a_round_trained_on_this_shops_topics_is_its_own() -> None:
    """What ``SHOPREC_LEARNER_REFRESH`` may replace without a confident gain."""
    shop_a = Settings(_env_file=None, topic_prefix="shop-a.")
    shop_b = Settings(_env_file=None, topic_prefix="shop-b.")
    assert is_own({"version": 3, "shop": shop_id(shop_a)}, shop_a)
    assert not is_own({"version": 3, "shop": shop_id(shop_b)}, shop_a)
    assert not is_own({"version": 2}, shop_a), "a card without a shop: trained from files"
    assert not is_own(None, shop_a), "the shipped version has no card"


# --- versions -------------------------------------------------------------------------------


def _version(base: Path, n: int, marker: str = "") -> None:
    (base / str(n)).mkdir(parents=True)
    (base / str(n) / "ranker.json").write_text(json.dumps({"n": n, "marker": marker}))


def test_candidates_wait_outside_the_served_repository(tmp_path: Path) -> None:
    v = Versions(tmp_path / "repo", tmp_path / "archive")
    _version(v.served_dir, 1)
    _version(v.served_dir, 2)
    assert v.live() == 2 and v.next_version() == 3
    _version(v.archive_dir, 3)
    assert v.served() == [1, 2] and v.live() == 2  # a candidate is never served
    assert v.next_version() == 4
    v.promote(3)
    assert v.served() == [1, 2, 3] and v.archived() == [] and v.live() == 3
    assert not list(v.served_dir.glob(f"{INCOMING}*"))
    v.retire(3)  # rollback: 2 is the newest served again, also after a restart
    assert v.served() == [1, 2] and v.archived() == [3] and v.next_version() == 4
    _version(v.archive_dir, 5)
    v.promote(5)
    _version(v.archive_dir, 4)
    with pytest.raises(ConfigError, match="older than the live version 5"):
        v.promote(4)
    v.record({"action": "promoted", "version": 5})
    assert [h["version"] for h in v.history()] == [5]


def test_every_triton_server_is_found(tmp_path: Path) -> None:
    assert triton_endpoints("127.0.0.1:8001, 127.0.0.1:9001") == [
        "127.0.0.1:8001",
        "127.0.0.1:9001",
    ]
    assert triton_endpoints("localhost:8001")[0].endswith(":8001")
    with pytest.raises(ConfigError, match="host:port"):
        triton_endpoints("triton")


def test_learner_metrics_say_last_training_promotion_and_live_ndcg() -> None:
    state = LearnerState(live_version=7, live_ndcg=0.123, last_training_ts=1.7e9)
    state.rounds["promoted"] += 1
    registry = CollectorRegistry()
    registry.register(LearnerCollector(state))
    text = generate_latest(registry).decode()
    assert 'shoprec_learner_rounds_total{outcome="promoted"} 1.0' in text
    assert "shoprec_learner_live_version 7.0" in text
    assert "shoprec_learner_live_ndcg_at_10 0.123" in text
    assert "shoprec_learner_last_training_timestamp_seconds 1.7e+09" in text
    assert "shoprec_learner_last_promotion_timestamp_seconds 0.0" in text


def test_the_first_round_starts_at_once_and_events_alone_can_trigger_the_next() -> None:
    only_events = Trigger(every_s=0, every_events=100)  # SHOPREC_LEARNER_EVERY_S=0
    assert only_events.due_by_time(0.0)
    only_events.started(0.0, 1_000)
    assert not only_events.due_by_time(1e9) and only_events.counts_events()
    assert not only_events.due_by_events(1_099) and only_events.due_by_events(1_100)
    only_time = Trigger(every_s=60, every_events=0)
    only_time.started(10.0, 5)
    assert not only_time.counts_events()
    assert not only_time.due_by_time(69.0) and only_time.due_by_time(70.0)


def test_a_round_with_too_few_events_is_retried_once_there_are_enough() -> None:
    t = Trigger(every_s=3600, every_events=50_000)
    t.started(0.0, 30)
    t.wait_for(30 + 200 - 25)  # 25 usable events of 200 needed
    assert t.counts_events() and not t.due_by_events(204) and t.due_by_events(205)
    t.started(1.0, 205)  # the retry: back to the schedule and every 50,000 events
    assert not t.due_by_events(5_000) and not t.due_by_time(3600.0) and t.due_by_time(3601.0)
    t.retry(4000.0)  # Kafka away: not counted, tried again later, not at every poll
    assert not t.due_by_time(4000.0 + RETRY_S - 1) and t.due_by_time(4000.0 + RETRY_S)


@pytest.fixture(scope="module")
def bert_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The catalogue's BERT vectors, computed once for the module's rounds."""
    return tmp_path_factory.mktemp("bert-cache")


class _StopOn(logging.Handler):
    """Sets ``stop`` when a log line starts with ``prefix``: a SIGTERM that lands there."""

    def __init__(self, stop: threading.Event, prefix: str) -> None:
        super().__init__(logging.INFO)
        self.stop, self.prefix, self.seen = stop, prefix, False

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(self.prefix):
            self.seen = True
            self.stop.set()


@pytest.mark.parametrize(
    ("lands_at", "stopped_while"),
    [
        ("training a candidate", "training (epoch 0)"),  # before the first batch
        ("fused epoch 0 ", "scoring"),  # after training: the written candidate is judged
    ],
)
def test_a_round_asked_to_stop_gives_up_at_its_next_checkpoint_and_leaves_no_candidate(
    tmp_path: Path, bert_cache: Path, lands_at: str, stopped_while: str
) -> None:
    """SIGTERM mid-round: the learner used to finish the round (minutes) and be SIGKILLed
    mid-write, leaving a version folder without a card that took a version number."""
    from dataclasses import replace

    from ops.learn import ShopHistory, train_round
    from ranking.data import load_rows
    from ranking.train import TrainOptions

    folder = DATA / "amazon-gift-cards-2018"
    history = ShopHistory(load_catalogue(folder), load_rows(folder), ["events"], "catalog", [])
    settings = Settings(_env_file=None, model_repo=tmp_path / "repo", model_archive=tmp_path / "a")
    versions = Versions.from_settings(settings)
    options = replace(LearnOptions(cache_dir=bert_cache), train=TrainOptions(max_epochs=1, seed=7))
    stop = threading.Event()
    watch = _StopOn(stop, lands_at)
    loggers = [logging.getLogger("shoprec.learn"), logging.getLogger("ranking.train")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(watch)
        lg.setLevel(logging.INFO)
    try:
        with pytest.raises(Interrupted, match=re.escape(f"stopped while {stopped_while}")):
            train_round(settings, history, versions, options, stop=stop)
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(watch)
            lg.setLevel(level)
    assert watch.seen
    left = [p.name for p in versions.archive_dir.glob("*") if p.is_dir()]
    assert versions.archived() == [] and left == [], "no half-written candidate"
    assert versions.next_version() == 1, "the version number is not used up"
    # Not asked to stop, the same round writes and judges its candidate.
    done = train_round(settings, history, versions, options, stop=threading.Event())
    assert done.version == 1 and (done.folder / "card.json").is_file()


def test_a_stop_reaches_the_replay_of_a_large_shop_before_its_end() -> None:
    """UCI's 396,337 events replay for minutes: the stop is looked at before every step."""
    from features.keys import EMB_DIM
    from ranking.data import build_dataset

    folder = DATA / "amazon-gift-cards-2018"
    cat = load_catalogue(folder)
    events = load_events(folder, cat)
    emb = np.zeros((len(cat), EMB_DIM), np.float32)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Interrupted, match="stopped while replaying the events"):
        build_dataset("amazon", cat, events, emb, progress=False, stop=stop)
    assert len(build_dataset("amazon", cat, events, emb, progress=False).queries) > 0


def test_the_repeat_baseline_counts_the_users_own_past_up_to_the_trigger(tmp_path: Path) -> None:
    """What the "repeat" baseline scores: each item's event-weighted count in the user's
    own events at or before the trigger (none after it, none of other users), halved per
    half-life of age; items the user never touched only by popularity, below all others."""
    from ranking.baselines import Popularity, Repeat
    from ranking.data import Period, load_dataset

    ds = load_dataset(DATA / "otto-sample", cache_dir=tmp_path, progress=False)
    ev, pop = ds.events, Popularity(ds, None)
    q = max(ds.period(Period.TEST), key=lambda q: q.hist_items.size)
    mine = ev.user == q.user
    before = mine & (ev.ts <= q.trigger_ts)
    assert (mine & (ev.ts > q.trigger_ts)).any(), "the query must have a future to leave out"
    expected = np.bincount(ev.item[before], weights=pop.w[before], minlength=len(ds.catalogue))
    np.testing.assert_allclose(Repeat(ds, pop, None).counts(q), expected, rtol=1e-6)

    day = 86_400_000
    halved = pop.w[before] * np.exp2((ev.ts[before] - q.trigger_ts) / day)
    decayed = np.bincount(ev.item[before], weights=halved, minlength=len(ds.catalogue))
    np.testing.assert_allclose(Repeat(ds, pop, day).counts(q), decayed, rtol=1e-5)

    scores = Repeat(ds, pop, None)([q])[0]
    assert scores[expected > 0].min() > scores[expected == 0].max()


def test_evaluate_pools_rolling_origins_into_one_report(tmp_path: Path) -> None:
    """``shoprec evaluate --origins 3``: three time splits, their test positives pooled,
    each origin's figures kept, the latest origin's split as ``split``."""
    from click.testing import CliRunner

    from cli.model import evaluate

    out = tmp_path / "eval.json"
    args = ["--data", str(DATA / "otto-sample"), "--json", str(out), "--cache", str(tmp_path)]
    got = CliRunner().invoke(evaluate, [*args, "--models", "popularity,covisitation"])
    assert got.exit_code == 0, got.output
    one = json.loads(out.read_text())
    got = CliRunner().invoke(evaluate, [*args, "--models", "covisitation", "--origins", "3"])
    assert got.exit_code == 0, got.output
    three = json.loads(out.read_text())
    # Other periods: the single split's report was not merged into.
    assert set(three["models"]) == {"covisitation"} and len(three["origins"]) == 3
    assert three["split"] == one["split"] == three["origins"][0]
    starts = [o["test_from_ts"] for o in three["origins"]]
    assert starts == sorted(starts, reverse=True)
    assert all(o["test_to_ts"] < s for o, s in zip(three["origins"][1:], starts, strict=False))
    per_origin = three["details"]["covisitation"]["per_origin"]
    assert per_origin[0]["n"] == one["models"]["covisitation"]["n"]
    assert three["models"]["covisitation"]["n"] == sum(o["n"] for o in per_origin)
    assert three["models"]["covisitation"]["n"] > one["models"]["covisitation"]["n"]


def test_the_stream_measurement_splits_by_the_version_that_served_each_list() -> None:
    """``bench.stream_quality.stream_ndcg`` on amazon's real events: lists from two versions,
    one that always holds the user's next item first and one that never does."""
    from bench.stream_quality import stream_ndcg

    with gzip.open(DATA / "amazon-gift-cards-2018" / "events.jsonl.gz") as f:
        events = [orjson.loads(line) for line in f][:600]
    nxt: dict[int, str] = {}
    following: dict[str, str] = {}
    for k in range(len(events) - 1, -1, -1):
        user = str(events[k]["user_id"])
        if user in following:
            nxt[k] = following[user]
        following[user] = str(events[k]["item_id"])
    start = 300
    recs = [
        {
            "trigger": {"event_id": e["event_id"]},
            "model": "good@1" if k % 2 else "bad@2",
            "items": [{"item_id": nxt[k] if k % 2 else "no such item"}],
        }
        for k, e in enumerate(events)
        if k >= start and k in nxt
    ]
    got, ours, _ = stream_ndcg(events, recs, start)
    good, bad = got["by_model"]["good@1"], got["by_model"]["bad@2"]
    assert good["events_scored"] + bad["events_scored"] == got["events_scored"] > 0
    assert got["lists_by_model"] == {"good@1": good["events_scored"], "bad@2": bad["events_scored"]}
    # A hit at rank 1 is an NDCG of 1, unless the next event repeats the item in view (not
    # scored) or its list was for an earlier event of the user (a later one had none).
    assert good["shoprec_ndcg@10"] > 0.5 and bad["shoprec_ndcg@10"] == 0.0
    pooled = (good["shoprec_ndcg@10"] * good["events_scored"]) / got["events_scored"]
    assert ours.ndcg == pytest.approx(pooled, abs=1e-3)
