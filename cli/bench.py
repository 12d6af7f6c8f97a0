"""`shoprec bench ...`: the benchmarks. Each lives in its own module under bench/."""

from __future__ import annotations

from pathlib import Path

import click

from shoprec.errors import ShoprecError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "rees46-sample"


def _numbers(kind: type[float] | type[int]) -> click.ParamType:
    class Numbers(click.ParamType):
        name = "N[,N...]"

        def convert(self, value: object, param: object, ctx: object) -> list[float | int]:
            if isinstance(value, list):
                return value
            try:
                return [kind(v) for v in str(value).split(",") if v.strip()]
            except ValueError:
                self.fail(f"{value!r} is not a comma-separated list of numbers")

    return Numbers()


@click.group(invoke_without_command=True)
@click.option(
    "--rate",
    "rates",
    type=_numbers(float),
    default="500",
    show_default=True,
    help="Offered events/s; a comma-separated list runs a sweep (e.g. 100,500,1000,2000).",
)
@click.option("--duration", default=30.0, show_default=True, help="Measured seconds per rate.")
@click.option("--warmup", default=3.0, show_default=True, help="Unmeasured seconds first.")
@click.option("--broker", type=click.Choice(["kafka", "tansu"]), default="kafka", show_default=True)
@click.option(
    "--workers",
    type=_numbers(int),
    default="1",
    show_default=True,
    help="Worker processes in one consumer group; a list (1,2) measures each.",
)
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=DEFAULT_DATA,
    show_default=True,
    help="Dataset whose real events (and catalogue) are offered.",
)
@click.option("--no-floor", is_flag=True, help="Skip the pass-through relay floor.")
@click.option(
    "--cluster",
    is_flag=True,
    help="On the cluster profile (3 Kafka nodes, Redis Cluster 3+3, 2 Tritons; about "
    "4.3 GiB), with the CPU per event of every process (`bench capacity` builds the "
    "capacity model from it).",
)
@click.option(
    "--min-emit-interval-ms",
    default=0,
    show_default=True,
    help="The workers' flood control; 0 lets every event trigger a ranked recommendation "
    "(the heaviest load), 30000 is the production default.",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the results here, and a latency plot beside it (.png).",
)
@click.pass_context
def bench(
    ctx: click.Context,
    rates: list[float],
    duration: float,
    warmup: float,
    broker: str,
    workers: list[int],
    data: Path,
    no_floor: bool,
    cluster: bool,
    min_emit_interval_ms: int,
    json_out: Path | None,
) -> None:
    """Measure shoprec on the real stack and real data; write JSON and a plot.

    Without a subcommand: the end-to-end benchmark. It starts a private stack
    (Apache Kafka or Tansu, Redis, Triton with BERT) on free ports, loads the
    dataset's catalogue, and for each offered rate measures first the floor, a
    pass-through relay (Kafka in, Kafka out, no processing), then shoprec's
    worker(s), both fed the dataset's real events open loop. Latency runs from
    each event's scheduled send time to the moment its output is read.

    \b
    Examples:
      shoprec bench --rate 500 --duration 30 --json bench/results/e2e.json
      shoprec bench --rate 100,500,1000,2000 --workers 1,2
      shoprec bench --broker tansu --rate 500
    """
    if ctx.invoked_subcommand is not None:
        return
    from bench.e2e import BenchOptions, run_bench

    opts = BenchOptions(
        data=data,
        rates=rates,
        duration_s=duration,
        warmup_s=warmup,
        broker=broker,
        workers=workers,
        json_out=json_out,
        skip_floor=no_floor,
        min_emit_interval_ms=min_emit_interval_ms,
        cluster=cluster,
    )
    try:
        result = run_bench(opts, REPO_ROOT / "model_repo")
    except ShoprecError as exc:
        raise click.ClickException(str(exc)) from exc
    for run in result["runs"]:
        click.echo(
            f"{run['broker']} {run['offered_rate']:.0f}/s x{run['workers']}: "
            f"latency {run['latency_ms']} floor {run.get('floor_ms')} lost {run['lost']}"
        )


from bench.features import features_command  # noqa: E402  (registered after the group exists)

bench.add_command(features_command, "features")
from bench.soak import soak_command  # noqa: E402

bench.add_command(soak_command, "soak")
from bench.capacity import capacity_command  # noqa: E402

bench.add_command(capacity_command, "capacity")
from bench.api import api_command  # noqa: E402

bench.add_command(api_command, "api")
