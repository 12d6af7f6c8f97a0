"""What the offline quality benchmarks share: the datasets they run on by default, and how
they publish their numbers (one JSON document stamped with the date and the machine,
printed, and with ``--json`` written with its plot beside it)."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import orjson

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT.parent / "shared" / "data"


def datasets(folders: Sequence[Path]) -> tuple[Path, ...]:
    """``folders``, or every dataset of ``../shared/data`` when none is named."""
    if folders:
        return tuple(folders)
    return tuple(sorted(p for p in DATA.iterdir() if (p / "events.jsonl.gz").exists()))


def publish(
    benchmark: str,
    fields: dict[str, Any],
    results: list[dict[str, Any]],
    json_path: Path | None,
    plot: Callable[[list[dict[str, Any]], Path], None],
) -> None:
    """Print the results as JSON; with ``json_path``, write them there and ``plot`` them
    beside it (the same name, ``.png``)."""
    doc = {
        "benchmark": benchmark,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        **fields,
        "results": results,
    }
    text = orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode()
    if json_path is not None:
        json_path.write_text(text + "\n")
        plot(results, json_path.with_suffix(".png"))
    click.echo(text)
