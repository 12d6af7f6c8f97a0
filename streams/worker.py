"""Starting the Faust worker, after checking that its dependencies answer."""

from __future__ import annotations

import logging

from features.connection import open_redis
from ranking.client import RankerClient
from shoprec.errors import DependencyUnavailable
from shoprec.settings import Settings
from streams.topics import ensure_topics

log = logging.getLogger("shoprec.worker")


async def preflight(settings: Settings, triton_timeout_s: float = 60.0) -> None:
    """Fail fast and clearly when Kafka, Redis or Triton is not there (never loop silently)."""
    await ensure_topics(settings)
    redis = open_redis(settings.redis_url, cluster=settings.redis_cluster, timeout_s=5.0)
    try:
        await redis.ping()
    except Exception as exc:
        raise DependencyUnavailable(
            f"cannot reach Redis: {exc}. Check SHOPREC_REDIS_URL (and its password)."
        ) from exc
    finally:
        await redis.aclose()
    ranker = RankerClient.from_settings(settings)
    try:
        models = [settings.item_encoder_model, settings.query_encoder_model, settings.ranker_model]
        await ranker.wait_ready(models, timeout_s=triton_timeout_s)
    finally:
        await ranker.close()
    log.info("preflight ok: Kafka, Redis and Triton answer")


def run_worker(settings: Settings, loglevel: str = "info") -> None:
    """Run the agents in this process until SIGINT/SIGTERM."""
    from faust.worker import Worker
    from mode.loop import use as use_event_loop

    from streams.app import create_app

    # uvloop: much of the agent's time goes to the event loop (socket reads and
    # writes for Kafka, Redis and Triton); libuv's loop does that work in C.
    if settings.event_loop == "uvloop":
        use_event_loop("uvloop")
    from streams.observability import logging_config

    app, _runtime = create_app(settings)
    # Text keeps Faust's own (coloured) format; JSON replaces it entirely.
    config = logging_config(settings, loglevel) if settings.log_format == "json" else None
    Worker(app, loglevel=loglevel, quiet=True, logging_config=config).execute_from_commandline()
