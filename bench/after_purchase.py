"""After a purchase, what do the next purchases look like: ``python -m bench.after_purchase``.

Issue 13 part 5 asks whether the list after a purchase should show complements (what is
bought together) rather than substitutes (what is viewed together), and to measure it as
the share of a customer's next purchases that the list shown after a purchase contains.

Per dataset in ``--data`` (default: every folder of ``../shared/data``), events in replay
order (``ranking.data.load_events``: by time, equal times by a hash of the event id) are
replayed once, test-then-learn: before a user's purchase basket (their purchases of one
timestamp) updates the counts, the list that each signal would show after the user's
*previous* basket is scored against this basket.  Baskets in the last ``--measure-frac``
of the stream are scored (all of them by default: rees46 and otto have few purchases).

The signals, all counted over the stream so far:

* ``popularity``: purchases per item;
* ``co-view``: the shipped co-visitation rule (``features.store.covisited``: the user's
  distinct items of the last 24 hours, any event type), counted both ways;
* ``co-purchase``: items the same user bought within ``--window-days`` of each other
  (the same basket included), counted both ways;
* ``co-purchase, then co-view``: co-purchase first, co-view breaking its ties and filling
  the list (then popularity), the mix a list after a purchase could serve.

A list is the ten best items by the sum of the signal over the previous basket's items,
never an item of that basket nor one the user bought within a day (the worker's filter).
Ties count half (``ranking.evaluate``). Each next-purchased item is one positive; HR@10 is
the share of them the list contained, NDCG@10 is reported beside it, both with 95%
bootstrap intervals over users, and the differences to co-view are paired.  Raw counts,
no time decay: the comparison is of the signals, not of the live weighting.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import numpy.typing as npt

from bench.report import bar, bars_with_intervals, data_option, datasets, json_option, publish
from features.candidates import JUST_PURCHASED_MS
from features.store import covisited
from features.user_state import HistoryEntry
from ranking.data import load_catalogue, load_events
from ranking.evaluate import K, Metrics, paired_difference
from shoprec.events import EventType

DAY_MS = 86_400_000
HISTORY = 50  # recent events kept per user for co-view pairing (the live history's length)
# A purchase pairs with at most this many of the user's latest distinct purchases, and a
# list is built from at most this many items of the basket: a wholesale customer's
# invoice of hundreds of lines would otherwise make the pairs quadratic in it.
SPAN = 20
F64 = npt.NDArray[np.float64]
SIGNALS = ("popularity", "co-view", "co-purchase", "co-purchase, then co-view")


@dataclass
class _Counts:
    n_items: int
    pop: npt.NDArray[np.float64] = field(init=False)
    view: dict[int, dict[int, float]] = field(default_factory=lambda: defaultdict(dict))
    bought: dict[int, dict[int, float]] = field(default_factory=lambda: defaultdict(dict))

    def __post_init__(self) -> None:
        self.pop = np.zeros(self.n_items)

    @staticmethod
    def pair(table: dict[int, dict[int, float]], a: int, b: int) -> None:
        table[a][b] = table[a].get(b, 0.0) + 1.0
        table[b][a] = table[b].get(a, 0.0) + 1.0

    def summed(self, table: dict[int, dict[int, float]], items: list[int]) -> F64:
        out = np.zeros(self.n_items)
        for i in items:
            for j, c in table.get(i, {}).items():
                out[j] += c
        return out

    def scores(self, signal: str, basket: list[int]) -> F64:
        if signal == "popularity":
            return np.array(self.pop, copy=True)
        view = self.summed(self.view, basket)
        if signal == "co-view":
            return view
        bought = self.summed(self.bought, basket)
        if signal == "co-purchase":
            return bought

        # Lexicographic: co-purchase, then co-view, then popularity (each below 1 of the
        # one before it, so it only orders what the one before left tied).
        def unit(x: F64) -> F64:
            out: F64 = x / (float(x.max()) + 1.0)
            return out

        return bought + unit(view) + 1e-3 * unit(self.pop)


def _rank(scores: F64, positive: int, blocked: set[int], positives: set[int]) -> float:
    """Expected rank of ``positive`` among the items that may be shown (ties count half)."""
    allowed = np.ones(scores.shape[0], dtype=np.bool_)
    allowed[list(blocked | positives)] = False
    pool = scores[allowed]
    s = scores[positive]
    return 1.0 + float((pool > s).sum()) + float((pool == s).sum()) / 2.0


def measure(folder: Path, window_days: float, measure_frac: float) -> dict[str, Any]:
    catalogue = load_catalogue(folder)
    ev = load_events(folder, catalogue)
    n = len(ev)
    counts = _Counts(len(catalogue.ids))
    start_ts = int(ev.ts[min(n - 1, int(n * (1.0 - measure_frac)))])
    metrics = {s: Metrics() for s in SIGNALS}
    history: dict[int, list[HistoryEntry]] = defaultdict(list)
    purchases: dict[int, list[tuple[int, int]]] = defaultdict(list)  # (ts, item), oldest first
    last_basket: dict[int, tuple[int, list[int]]] = {}  # user -> (ts, items)
    users, items, types, tss = (
        ev.user.tolist(),
        ev.item.tolist(),
        ev.type.tolist(),
        ev.ts.tolist(),
    )
    baskets_scored = 0
    window_ms = window_days * DAY_MS
    k = 0
    while k < n:
        ts = tss[k]
        end = k
        while end < n and tss[end] == ts:
            end += 1
        bought_now: dict[int, list[int]] = defaultdict(list)
        for j in range(k, end):
            if types[j] == EventType.PURCHASE and items[j] not in bought_now[users[j]]:
                bought_now[users[j]].append(items[j])
        # Test: the list after each user's previous basket, against this basket.
        if ts >= start_ts:
            for u, basket in bought_now.items():
                prev = last_basket.get(u)
                if prev is None:
                    continue
                prev_ts, prev_items = prev
                blocked = set(prev_items) | {
                    i for t, i in purchases[u] if prev_ts - t <= JUST_PURCHASED_MS
                }
                positives = set(basket) - blocked
                if not positives:
                    continue
                baskets_scored += 1
                for signal in SIGNALS:
                    scores = counts.scores(signal, prev_items[:SPAN])
                    for p in sorted(positives):
                        metrics[signal].add(_rank(scores, p, blocked, positives), u)
        # Learn: every event of this timestamp.
        for j in range(k, end):
            u, i, t = users[j], items[j], types[j]
            item_id = str(i)
            for other in covisited(item_id, ts, history[u]):
                counts.pair(counts.view, i, int(other))
            history[u].insert(0, HistoryEntry(item_id, str(t), ts))
            del history[u][HISTORY:]
        for u, basket in bought_now.items():
            recent: list[int] = []  # newest first, distinct, within the window
            for t, i in reversed(purchases[u]):
                if ts - t > window_ms or len(recent) >= SPAN:
                    break
                if i not in recent:
                    recent.append(i)
            for a_pos, a in enumerate(basket):
                counts.pop[a] += 1.0
                partners = list(dict.fromkeys([*reversed(basket[:a_pos]), *recent]))
                for b in partners[:SPAN]:
                    if b != a:
                        counts.pair(counts.bought, a, b)
            purchases[u].extend((ts, i) for i in basket)
            last_basket[u] = (ts, basket)
        k = end
    done = {s: m.finish() for s, m in metrics.items()}
    base = done["co-view"]
    out: dict[str, Any] = {
        "dataset": folder.name,
        "events": n,
        "purchases": int((ev.type == EventType.PURCHASE).sum()),
        "baskets_scored": baskets_scored,
        "positives": base.n,
        "users": len(set(base.users)),
        "signals": {},
    }
    for s, m in done.items():
        row = m.to_json()
        row[f"hr@{K}_ci95"] = [round(x, 4) for x in m.hr_ci().bounds] if m.n else [0.0, 0.0]
        if s != "co-view" and m.n:
            row["ndcg_vs_co-view"] = paired_difference(m, base).to_json()
        out["signals"][s] = row
    return out


def _plot(results: list[dict[str, Any]], path: Path) -> None:
    bars_with_intervals(
        path,
        [f"{r['dataset']}\n({r['positives']} next purchases)" for r in results],
        {signal: [bar(r["signals"][signal], f"hr@{K}") for r in results] for signal in SIGNALS},
        f"share of next purchases in the list (HR@{K})",
        "The list after a purchase: bought together vs viewed together (95% CI)",
    )


@click.command()
@data_option
@click.option("--window-days", default=30.0, show_default=True, help="Co-purchase window.")
@click.option(
    "--measure-frac",
    default=1.0,
    show_default=True,
    help="Share of the stream (by events, at its end) whose baskets are scored; 1 scores "
    "every basket (test-then-learn from the first event).",
)
@json_option
def main(
    folders: tuple[Path, ...], window_days: float, measure_frac: float, json_path: Path | None
) -> None:
    """Share of next purchases that the list after a purchase contains, per signal."""
    chosen = datasets(folders)
    results = []
    for folder in chosen:
        click.echo(f"{folder.name}: replaying ...", err=True)
        results.append(measure(folder, window_days, measure_frac))
        for s, row in results[-1]["signals"].items():
            lo, hi = row[f"hr@{K}_ci95"]
            click.echo(
                f"  {s:<28} HR@{K} {row[f'hr@{K}']:.4f} [{lo:.4f}, {hi:.4f}]  "
                f"NDCG@{K} {row[f'ndcg@{K}']:.4f}  ({row['n']} next purchases)",
                err=True,
            )
    publish(
        "after-purchase",
        {"window_days": window_days, "measure_frac": measure_frac, "k": K},
        results,
        json_path,
        _plot,
    )


if __name__ == "__main__":
    main()
