"""`shoprec serve` (the pull API) and `shoprec openapi` (its spec)."""

from __future__ import annotations

from pathlib import Path

import click
import orjson

from shoprec.settings import load_settings

REPO_ROOT = Path(__file__).resolve().parents[1]
OPENAPI_FILE = REPO_ROOT / "docs" / "openapi.json"


@click.command()
@click.option("--host", help="Address to bind [SHOPREC_API_HOST, default 127.0.0.1].")
@click.option("--port", type=int, help="Port to listen on [SHOPREC_API_PORT, default 8080].")
@click.option("--log-level", default="info", show_default=True, help="Log level.")
def serve(host: str | None, port: int | None, log_level: str) -> None:
    """Serve recommendations over HTTP until Ctrl-C / SIGTERM: the pull API.

    \b
      GET /v1/users/{user_id}/recommendations?k=&context_item=&query=
      GET /v1/items/{item_id}/similar?k=
      GET /health  /ready  /metrics  /openapi.json
    Same state (Redis) and ranker (Triton) as the worker; needs both to start,
    then serves degraded lists while Triton is down. SHOPREC_API_KEY asks for an
    X-API-Key header on /v1; SHOPREC_API_RATE_LIMIT limits each client address.
    """
    from api.server import run

    overrides = {k: v for k, v in {"api_host": host, "api_port": port}.items() if v is not None}
    try:
        settings = load_settings(**overrides)
    except Exception as exc:
        raise click.ClickException(f"invalid settings: {exc}") from exc
    run(settings, log_level)


@click.command()
@click.option(
    "--write",
    is_flag=True,
    help=f"Write it to {OPENAPI_FILE.relative_to(REPO_ROOT)} instead of printing it.",
)
def openapi(write: bool) -> None:
    """The pull API's OpenAPI spec (as the default settings configure it)."""
    text = openapi_text()
    if write:
        OPENAPI_FILE.write_text(text)
        click.echo(f"wrote {OPENAPI_FILE}", err=True)
    else:
        click.echo(text, nl=False)


def openapi_text() -> str:
    """The spec as ``docs/openapi.json`` holds it (a unit test holds the file to this)."""
    from api.app import openapi_spec

    return (
        orjson.dumps(openapi_spec(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()
        + "\n"
    )


COMMANDS = (serve, openapi)
