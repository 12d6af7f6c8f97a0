"""`shoprec bench ...`: the benchmarks. Each lives in its own module under bench/."""

from __future__ import annotations

from pathlib import Path

import click

from bench.report import DATA, REPO_ROOT
from shoprec.errors import ShoprecError

DEFAULT_DATA = DATA / "rees46-sample"
# Items with long descriptions, for --catalog-load.
DEFAULT_LOAD_DATA = DATA / "amazon-gift-cards-2018"


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
    "--items",
    type=_numbers(int),
    default="",
    help="Catalogue sizes (e.g. 10000,100000,1000000): before its rates, each grows the "
    "catalogue to that many items (noisy copies of the real embedded items, written to "
    "Redis) and restarts Triton on it; the JSON gets memory and IVF recall per size.",
)
@click.option(
    "--catalog-load",
    default=0,
    show_default=True,
    help="Items with descriptions sent to the catalogue topic while events stream, after "
    "--duration seconds without; latency and degraded before, during and after, and items/s.",
)
@click.option(
    "--load-data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=DEFAULT_LOAD_DATA,
    show_default=True,
    help="Dataset whose items (those with a description, cycled) --catalog-load sends.",
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
    items: list[int],
    catalog_load: int,
    load_data: Path,
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
      shoprec bench --items 10000,100000,1000000 --rate 500 --json bench/results/e2e-items.json
      shoprec bench --catalog-load 10000 --rate 200 --json bench/results/e2e-catalog-load.json
    """
    if ctx.invoked_subcommand is not None:
        return
    if cluster and items:
        raise click.UsageError("--items runs on the single-node stack, not with --cluster")
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
        items=items,
        catalog_load=catalog_load,
        load_data=load_data,
    )
    try:
        result = run_bench(opts, REPO_ROOT / "model_repo")
    except ShoprecError as exc:
        raise click.ClickException(str(exc)) from exc
    for run in result["runs"]:
        click.echo(
            f"{run['broker']} {run['offered_rate']:.0f}/s x{run['workers']}: "
            f"latency {run['latency_ms']} floor {run.get('floor_ms')} lost {run['lost']}"
            + (f" items {run['items']:,}" if "items" in run else "")
        )
        if "catalog_load" in run:
            load = run["catalog_load"]
            click.echo(
                f"  catalogue load: {load['stored']}/{load['items']} items in "
                f"{load['seconds']} s ({load['items_per_s']} items/s); latency "
                f"{load['latency_ms']}; degraded {load['degraded']}"
            )
    for size in result.get("catalogue_sizes", []):
        r = size["retrieval"]
        click.echo(
            f"{size['items']:,} items: table {r['table_items']:,} ({r['index_in_triton']}), "
            f"Triton RSS {size['triton_rss_mb']} MiB, worker peak RSS "
            f"{size['worker_peak_rss_mb']} MiB, Redis {size['redis_used_memory_mb']} MiB, "
            f"IVF recall@100 {r['ivf_recall_at_100']}"
        )


from bench.features import features_command  # noqa: E402  (registered after the group exists)

bench.add_command(features_command, "features")
from bench.soak import soak_command  # noqa: E402

bench.add_command(soak_command, "soak")
from bench.capacity import capacity_command  # noqa: E402

bench.add_command(capacity_command, "capacity")
from bench.api import api_command  # noqa: E402

bench.add_command(api_command, "api")
