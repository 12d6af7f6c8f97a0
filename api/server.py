"""Running the pull API: uvicorn, one process, uvloop and httptools, logs as the worker's."""

from __future__ import annotations

import logging

import uvicorn

from api.app import create_app
from shoprec.settings import Settings
from streams.observability import logging_config

log = logging.getLogger("shoprec.api")


def run(settings: Settings, log_level: str = "info") -> None:
    """Serve on ``SHOPREC_API_HOST:SHOPREC_API_PORT`` until SIGINT/SIGTERM (graceful)."""
    config = uvicorn.Config(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        loop="uvloop" if settings.event_loop == "uvloop" else "asyncio",
        http="httptools",
        lifespan="on",
        # No access log: its lines would carry user ids (in the path) and search queries;
        # the metrics count every request, and errors are logged redacted.
        access_log=False,
        log_config=logging_config(settings, log_level),
        log_level=log_level,
        server_header=False,
        timeout_graceful_shutdown=10,
    )
    log.info(
        "pull API on http://%s:%d (API key %s, rate limit %s)",
        settings.api_host,
        settings.api_port,
        "required" if settings.api_key.get_secret_value() else "not set",
        f"{settings.api_rate_limit:g}/s per client" if settings.api_rate_limit else "off",
    )
    uvicorn.Server(config).run()
