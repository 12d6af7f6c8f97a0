"""What the benchmarks share: progress lines on stderr (:func:`say`), a result written as
JSON with its plot beside it (:func:`write_results`), running a ``shoprec`` command as an
operator does (:func:`shoprec`); and for the offline quality benchmarks, the datasets they
run on by default (and the ``--data`` option naming others), how they publish their
numbers (one JSON document stamped with the date and the machine, printed, and with
``--json`` written with its plot beside it), and their plot: bars per group and series
with 95% intervals."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import orjson

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT.parent / "shared" / "data"


def say(msg: str) -> None:
    """A progress line on stderr (stdout stays for results)."""
    print(msg, file=sys.stderr, flush=True)


def write_results(
    result: dict[str, Any], path: Path, plot: Callable[[dict[str, Any], Path], None]
) -> None:
    """``result`` as indented JSON at ``path``, and ``plot(result, <path>.png)`` beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    plot(result, path.with_suffix(".png"))
    say(f"wrote {path} and {path.with_suffix('.png')}")


def datasets(folders: Sequence[Path]) -> tuple[Path, ...]:
    """``folders``, or every dataset of ``../shared/data`` when none is named."""
    if folders:
        return tuple(folders)
    return tuple(sorted(p for p in DATA.iterdir() if (p / "events.jsonl.gz").exists()))


data_option = click.option(
    "--data",
    "folders",
    multiple=True,
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Dataset folder (repeatable); default: every folder of ../shared/data.",
)
json_option = click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the results here, and a plot beside it (.png).",
)


Bar = tuple[float, tuple[float, float]]
"""A value and its 95% interval."""


def bar(row: dict[str, Any], key: str) -> Bar:
    """``row[key]`` and its interval ``row[key + "_ci95"]`` as the results JSON holds them
    (None, where nothing was measured, draws as 0)."""
    lo, hi = row[f"{key}_ci95"]
    return row[key] or 0.0, (lo or 0.0, hi or 0.0)


def bars_with_intervals(
    path: Path,
    groups: Sequence[str],
    series: dict[str, Sequence[Bar]],
    ylabel: str,
    title: str,
) -> None:
    """One bar per group and series (each series a value per group), with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(9.0, 1.2 * len(groups)), 4.5))
    width = 0.8 / len(series)
    for n, (name, values) in enumerate(series.items()):
        xs = [k + (n - (len(series) - 1) / 2) * width for k in range(len(groups))]
        ys = [v for v, _ in values]
        err = [[v - lo for v, (lo, _) in values], [hi - v for v, (_, hi) in values]]
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def shoprec(env: dict[str, str], *args: str, timeout: float = 1800) -> str:
    """``shoprec ARGS`` as an operator runs it; its output, or a ClickException with the
    last lines of what it said."""
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise click.ClickException(f"shoprec {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout
