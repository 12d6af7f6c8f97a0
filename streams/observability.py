"""What an on-call engineer can see of a running worker: Prometheus metrics and JSON logs.

Metrics are read from the worker's :class:`~streams.metrics.WorkerStats` at
scrape time (a custom collector), so the hot path only bumps plain counters:

    shoprec_events_total{topic}                 input records by topic (= event type)
    shoprec_outcomes_total{outcome}             recommended, duplicate, rate_limited, ...
    shoprec_dead_letters_total{reason}          records sent to recs.dlq, by reason
    shoprec_degraded_total                      recommendations from the fallback path
    shoprec_re_emitted_total                    recommendations published again for triggers
                                                redelivered after a crash before publishing
    shoprec_event_age_ms                        histogram: event time -> emission
    shoprec_stage_ms{stage}                     histogram per pipeline stage; stage="ranker"
                                                is the Triton call
    shoprec_triton_errors_total                 ranker calls answered by the fallback
                                                plus failed query embeddings
    shoprec_consumer_lag{topic,partition}       end offset - committed offset, every 10 s
                                                (streams/lag.py; not on Tansu)
    shoprec_stage_recent_ms{stage,quantile}     p50/p95/p99 per stage over the latest
                                                10,000 batches, as the stats line logs them
    shoprec_batch_size_recent{quantile}         p50/p95/p99 micro-batch size, likewise
    shoprec_arm_users_total{experiment,arm}     users assigned to each arm (first seen)
    shoprec_arm_lists_total{experiment,arm}     lists shown (shadow arms: lists scored)
    shoprec_arm_attributed_total{experiment,arm,outcome}
                                                clicks, carts, purchases credited to its lists
    shoprec_arm_revenue_total{experiment,arm}   revenue of the purchases credited to its lists
    shoprec_arm_purchases_total{experiment,arm} every purchase of the arm's users, credited
                                                or not (the holdout's baseline), and
    shoprec_arm_spend_total{experiment,arm}     their revenue

:func:`scrape` reads the counters back (benchmarks and fault tests do, never a log line).

The endpoint binds to ``SHOPREC_METRICS_HOST`` (127.0.0.1 by default: metrics
are not for the internet) on ``SHOPREC_METRICS_PORT`` (0 turns it off).
"""

from __future__ import annotations

import logging
import threading
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from shoprec.errors import describe
from shoprec.settings import Settings
from streams.lag import LagProbe, lag_is_known
from streams.metrics import Histogram, WorkerStats, percentiles

log = logging.getLogger("shoprec.observability")

LAG_EVERY_S = 10.0
# The stats line's percentile names and the Prometheus quantile label of each.
QUANTILES = {"p50": "0.5", "p95": "0.95", "p99": "0.99"}
OUTCOMES = (
    "recommended",
    "duplicates",
    "rate_limited",
    "coalesced",
    "suppressed",
    "held_out",
    "dead_lettered",
)
# Experiment counters (streams.metrics.WorkerStats.experiment): metric -> what it counts.
ARM_METRICS = {
    "shoprec_arm_users": ("users", "Users assigned to each arm of the experiment."),
    "shoprec_arm_lists": ("lists", "Lists shown per arm (shadow arms: lists scored)."),
    "shoprec_arm_revenue": ("revenue", "Revenue of purchases credited to each arm's lists."),
    "shoprec_arm_purchases": ("buys", "Every purchase of each arm's users, credited or not."),
    "shoprec_arm_spend": ("spend", "Revenue of every purchase of each arm's users."),
}
_ARM_OUTCOMES = ("click", "cart", "purchase")
# Fields of a log record every record has; anything else was passed as ``extra``.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class StatsCollector(Collector):
    """Prometheus view of one worker's stats (and its last consumer-lag probe)."""

    def __init__(self, stats: WorkerStats) -> None:
        self._stats = stats
        self.lag: dict[tuple[str, int], int] = {}

    def collect(self) -> Iterator[Metric]:
        st = self._stats
        by_topic = CounterMetricFamily(
            "shoprec_events", "Input records by topic.", labels=["topic"]
        )
        for topic, n in sorted(dict(st.events_by_topic).items()):
            by_topic.add_metric([topic], n)
        yield by_topic
        outcomes = CounterMetricFamily(
            "shoprec_outcomes", "Where each input record ended.", labels=["outcome"]
        )
        for name in OUTCOMES:
            outcomes.add_metric([name], getattr(st, name))
        yield outcomes
        dead = CounterMetricFamily(
            "shoprec_dead_letters", "Records sent to the DLQ, by reason.", labels=["reason"]
        )
        for reason, n in sorted(dict(st.dead_by_reason).items()):
            dead.add_metric([reason], n)
        yield dead
        yield CounterMetricFamily(
            "shoprec_degraded", "Recommendations from the fallback path.", value=st.degraded
        )
        yield CounterMetricFamily(
            "shoprec_re_emitted",
            "Recommendations published again for triggers redelivered after a crash.",
            value=st.re_emitted,
        )
        yield CounterMetricFamily(
            "shoprec_triton_errors",
            "Ranker calls answered by the fallback plus failed query embeddings.",
            value=st.triton_errors,
        )
        yield CounterMetricFamily(
            "shoprec_catalog_items", "Catalogue records applied.", value=st.catalog_items
        )
        yield _histogram("shoprec_event_age_ms", "Event time to emission (ms).", st.event_age_ms)
        stages = HistogramMetricFamily(
            "shoprec_stage_ms",
            "Milliseconds per micro-batch in each stage (ranker = the Triton call).",
            labels=["stage"],
        )
        for stage, hist in sorted(dict(st.stage_hist_ms).items()):
            stages.add_metric([stage], *_buckets(hist))
        yield stages
        lag = GaugeMetricFamily(
            "shoprec_consumer_lag",
            "Records not yet committed by the consumer group, per partition.",
            labels=["topic", "partition"],
        )
        for (topic, partition), n in sorted(self.lag.items()):
            lag.add_metric([topic, str(partition)], n)
        yield lag
        # The percentiles the stats line logs, over the latest 10,000 batches: what a
        # benchmark reports per stage (the histograms' buckets are too coarse for that).
        recent = GaugeMetricFamily(
            "shoprec_stage_recent_ms",
            "Percentiles of each stage's milliseconds over the latest 10,000 micro-batches.",
            labels=["stage", "quantile"],
        )
        for stage, values in sorted(dict(st.stage_ms).items()):
            for p, value in percentiles(list(values)).items():
                recent.add_metric([stage, QUANTILES[p]], value)
        yield recent
        sizes = GaugeMetricFamily(
            "shoprec_batch_size_recent",
            "Percentiles of the micro-batch size over the latest 10,000 batches.",
            labels=["quantile"],
        )
        for p, value in percentiles(list(st.batch_sizes)).items():
            sizes.add_metric([QUANTILES[p]], value)
        yield sizes
        yield from _arm_families(dict(st.experiment))


def _arm_families(counts: dict[tuple[str, str, str], float]) -> Iterator[Metric]:
    """The experiment's counters per arm (see the module docstring)."""
    for name, (what, doc) in ARM_METRICS.items():
        family = CounterMetricFamily(name, doc, labels=["experiment", "arm"])
        for (exp, arm, w), n in sorted(counts.items()):
            if w == what:
                family.add_metric([exp, arm], n)
        yield family
    credited = CounterMetricFamily(
        "shoprec_arm_attributed",
        "Clicks, carts and purchases credited to each arm's lists.",
        labels=["experiment", "arm", "outcome"],
    )
    for (exp, arm, w), n in sorted(counts.items()):
        if w in _ARM_OUTCOMES:
            credited.add_metric([exp, arm, w], n)
    yield credited


def _buckets(hist: Histogram) -> tuple[list[tuple[str, float]], float]:
    counts = list(hist.counts)  # a copy: the worker thread keeps counting
    cumulative, out = 0, []
    for bound, n in zip([*map(floatToGoString, hist.bounds), "+Inf"], counts, strict=True):
        cumulative += n
        out.append((bound, float(cumulative)))
    return out, hist.total


def _histogram(name: str, doc: str, hist: Histogram) -> HistogramMetricFamily:
    buckets, total = _buckets(hist)
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total)


def serve_metrics(settings: Settings, collector: Collector) -> bool:
    """Start the /metrics endpoint in a daemon thread; False (logged) when the port is taken.

    A taken port must not stop the worker: recommendations matter more than
    their metrics, and the error line says which port to free or change.
    """
    if settings.metrics_port == 0:
        return False
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    try:
        start_http_server(settings.metrics_port, settings.metrics_host, registry=registry)
    except OSError as exc:
        log.error(
            "metrics endpoint %s:%d not started: %s (set SHOPREC_METRICS_PORT, 0 = off)",
            settings.metrics_host,
            settings.metrics_port,
            exc,
        )
        return False
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
    return True


def install(app: Any, stats: WorkerStats, settings: Settings, topics: Sequence[str]) -> None:
    """Give a Faust app its /metrics endpoint and the consumer-lag probe."""
    collector = StatsCollector(stats)

    @app.task  # type: ignore[untyped-decorator]
    async def start_metrics() -> None:
        serve_metrics(settings, collector)

    if not lag_is_known(settings):
        # Said once here; probing would only fail every 10 s (streams/lag.py says why).
        log.info("consumer lag is not reported: the %s broker cannot tell it", settings.broker)
        return
    probe = LagProbe(settings, settings.app_id, topics)
    failing = False

    @app.timer(LAG_EVERY_S)  # type: ignore[untyped-decorator]
    async def probe_lag() -> None:
        nonlocal failing
        try:
            collector.lag = await probe.per_partition()
        except Exception as exc:  # lag is advisory; the next probe tries again
            # Once per outage, not every 10 s.
            level = logging.DEBUG if failing else logging.WARNING
            log.log(level, "lag probe failed: %s", describe(exc))
            failing = True
        else:
            if failing:
                log.info("lag probe answers again")
            failing = False

    @app.on_before_shutdown.connect  # type: ignore[untyped-decorator]
    async def close_probe(sender: Any, /, *args: Any, **kwargs: Any) -> None:
        await probe.close()


# --- reading it back -------------------------------------------------------------------


def worker_counters(text: str) -> dict[str, Any]:
    """A worker's counters from its ``/metrics`` text, named as in its stats line
    (:meth:`~streams.metrics.WorkerStats.summary`): ``events_in`` (every input record,
    the sum of ``shoprec_events_total``), the outcome buckets, ``re_emitted``,
    ``degraded``, ``catalog_items``, the recent ``stages_ms`` and ``batch_size``
    percentiles, and ``experiments``: experiment -> arm -> counter (``users``, ``lists``,
    ``click``, ``cart``, ``purchase``, ``revenue``, ``buys``, ``spend``).  The benchmarks
    and the fault tests read a worker through this."""
    names = {v: k for k, v in QUANTILES.items()}
    out: dict[str, Any] = dict.fromkeys(
        ("events_in", *OUTCOMES, "re_emitted", "degraded", "catalog_items"), 0
    )
    stages: dict[str, dict[str, float]] = {}
    batch_size: dict[str, float] = {}
    arms: dict[str, dict[str, dict[str, float]]] = {}
    by_metric = {f"{name}_total": what for name, (what, _) in ARM_METRICS.items()}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "shoprec_events_total":
                out["events_in"] += int(value)
            elif name == "shoprec_outcomes_total":
                out[labels["outcome"]] = int(value)
            elif name in ("shoprec_re_emitted_total", "shoprec_degraded_total"):
                out[name.removeprefix("shoprec_").removesuffix("_total")] = int(value)
            elif name == "shoprec_catalog_items_total":
                out["catalog_items"] = int(value)
            elif name == "shoprec_stage_recent_ms":
                stages.setdefault(labels["stage"], {})[names[labels["quantile"]]] = value
            elif name == "shoprec_batch_size_recent":
                batch_size[names[labels["quantile"]]] = value
            elif name in by_metric or name == "shoprec_arm_attributed_total":
                what = by_metric.get(name) or labels["outcome"]
                arm = arms.setdefault(labels["experiment"], {}).setdefault(labels["arm"], {})
                arm[what] = value
    return out | {"stages_ms": stages, "batch_size": batch_size, "experiments": arms}


def scrape(url: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """:func:`worker_counters` of the endpoint at ``url`` (``http://host:port/metrics``)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as reply:
        return worker_counters(reply.read().decode())


# --- logs ----------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and every ``extra`` field given
    (``event_id``, ``user_id``, ``reason``, ``topic``, ``partition``, ``offset`` ...), so a
    log search for an event id finds every line about it."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "thread": threading.current_thread().name,
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def logging_config(settings: Settings, level: str = "INFO") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for ``SHOPREC_LOG_FORMAT`` (text or json), on stderr."""
    formatter: dict[str, Any] = (
        {"()": JsonFormatter} if settings.log_format == "json" else {"format": TEXT_FORMAT}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": level.upper(), "handlers": ["stderr"]},
    }
