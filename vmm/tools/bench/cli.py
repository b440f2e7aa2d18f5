"""`vmm bench`: the benchmark commands (click only: parse, run the benchmark, print, write JSON)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vmm.errors import VmmError
from vmm.memory import HUGE_PAGE_SIZE
from vmm.tools.units import parse_size
from vmm.tools.usage import fail

from . import common as bench_common
from . import conversions as bench_conversions
from . import exits as bench_exits
from . import memslots as bench_memslots
from . import memslots_report
from . import paging as bench_paging
from . import trace as bench_trace

json_option = click.option("--json", "json_path", default=None, metavar="FILE", help="Write the figures to this file.")


def write_figures(json_path: str | None, result: dict) -> None:
    """--json: write ``result`` there (fsynced) and say so."""
    if json_path:
        bench_common.write_json(json_path, result)
        click.echo(f"wrote {json_path}")


@click.group()
def bench() -> None:
    """Benchmarks: print figures and write JSON; compare against a reference measured in the same run."""


@bench.command("exits")
@click.option(
    "--exits",
    "n",
    type=click.IntRange(1),
    default=bench_exits.DEFAULT_EXITS,
    show_default=True,
    help="SYNC ucalls per run.",
)
@click.option(
    "--repeats",
    type=click.IntRange(1),
    default=bench_exits.DEFAULT_REPEATS,
    show_default=True,
    help="Runs of each loop, interleaved.",
)
@json_option
@click.option("--check", is_flag=True, help="Exit 1 when the ratio is above the target.")
def bench_exits_cmd(n: int, repeats: int, json_path: str | None, check: bool) -> None:
    """PIO ucall round trip: vmm's run loop against a minimal C KVM_RUN loop."""
    result = bench_exits.run_exit_bench(n, repeats)
    click.echo(bench_exits.format_table(result))
    write_figures(json_path, result)
    sys.exit(1 if check and not result["within_target"] else 0)


@bench.command("conversions")
@click.option("--size", default="1G", show_default=True, help="Guest-driven sweep size (multiple of 2M).")
@click.option(
    "--size-4k", default=None, help="Smaller size for the 4K sweep only; its exits are scaled to --size (labelled)."
)
@click.option("--peak-size", default="256M", show_default=True, help="Populated region of the peak-allocation sweeps.")
@click.option(
    "--repeats",
    type=click.IntRange(1),
    default=bench_conversions.DEFAULT_REPEATS,
    show_default=True,
    help="Runs of the C test and of our port.",
)
@click.option("--sweep-repeats", type=click.IntRange(1), default=1, show_default=True, help="Runs of each sweep.")
@click.option(
    "--c-test",
    default=None,
    metavar="PATH",
    help="C private_mem_conversions_test [default: ~/.cache/vmm/kselftests/private_mem_conversions_test].",
)
@click.option("--skip", multiple=True, type=click.Choice(bench_conversions.PARTS), help="Leave a part out.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=bench_conversions.DEFAULT_TIMEOUT,
    show_default=True,
    help="Seconds per sweep direction.",
)
@json_option
@click.option("--check", is_flag=True, help="Exit 1 when a target is missed.")
def bench_conversions_cmd(
    size: str,
    size_4k: str | None,
    peak_size: str,
    repeats: int,
    sweep_repeats: int,
    c_test: str | None,
    skip: tuple[str, ...],
    timeout: float,
    json_path: str | None,
    check: bool,
) -> None:
    """Conversions/s and exits per MiB at 4K and 2M, peak allocation, C test vs our port (needs private memory)."""
    result = bench_conversions.run_conversion_bench(
        size=parse_size(size),
        size_4k=parse_size(size_4k) if size_4k else None,
        peak_size=parse_size(peak_size),
        repeats=repeats,
        sweep_repeats=sweep_repeats,
        c_test=Path(c_test).expanduser() if c_test else None,
        skip=skip,
        timeout=timeout,
        checkpoint=(lambda r: bench_common.write_json(json_path, r)) if json_path else None,
    )
    click.echo(bench_conversions.format_table(result))
    if json_path:
        click.echo(f"wrote {json_path}")
    sys.exit(1 if check and not bench_conversions.within_targets(result) else 0)


@bench.command("memslots")
@click.option("--size", default="1G", show_default=True, help="Guest data memory (4 memslots, one per thread).")
@click.option(
    "--rounds",
    type=click.IntRange(1),
    default=bench_memslots.DEFAULT_ROUNDS,
    show_default=True,
    help="Round trips (to private and back) per thread and point.",
)
@click.option(
    "--repeats",
    type=click.IntRange(1),
    default=bench_memslots.DEFAULT_REPEATS,
    show_default=True,
    help="Interleaved runs of each way per point (medians).",
)
@click.option("--vcpus", type=click.IntRange(1, 64), default=None, help="N, the most vCPUs touching [max(2, CPUs)].")
@click.option("--full", is_flag=True, help="Every combination of vCPUs, slots and threads (slow under TCG).")
@click.option("--way", "ways", multiple=True, type=click.Choice(bench_memslots.WAYS), help="Only these ways.")
@click.option("--touch-stride", default="64K", show_default=True, help="Bytes between the vCPUs' touches.")
@json_option
@click.option("--plot", "plot_path", default=None, metavar="FILE", help="Draw µs/conversion and stall (SVG).")
def bench_memslots_cmd(
    size: str,
    rounds: int,
    repeats: int,
    vcpus: int | None,
    full: bool,
    ways: tuple[str, ...],
    touch_stride: str,
    json_path: str | None,
    plot_path: str | None,
) -> None:
    """Conversions by memory attributes (vmm's way) against memslot updates, with vCPUs running."""
    if plot_path:
        memslots_report.require_matplotlib()
    stride = parse_size(touch_stride)
    if stride <= 0 or stride % 4096:
        raise click.BadParameter(f"{touch_stride} is not a positive multiple of 4K", param_hint="--touch-stride")
    result = bench_memslots.run_memslot_bench(
        size=parse_size(size),
        rounds=rounds,
        repeats=repeats,
        vcpus=vcpus,
        full=full,
        ways=ways or bench_memslots.WAYS,
        touch_stride=stride,
        checkpoint=(lambda r: bench_common.write_json(json_path, r)) if json_path else None,
    )
    click.echo(memslots_report.format_table(result))
    if json_path:
        click.echo(f"wrote {json_path}")
    if plot_path:
        memslots_report.plot(result, plot_path)
        click.echo(f"wrote {plot_path}")


@bench.command("trace")
@click.option(
    "--exits",
    "n",
    type=click.IntRange(1),
    default=bench_trace.DEFAULT_EXITS,
    show_default=True,
    help="SYNCs of the exit loop.",
)
@click.option("--sweep", default="1M", show_default=True, help="Size of the 4K conversion sweep (nested only).")
@click.option(
    "--repeats",
    type=click.IntRange(1),
    default=bench_trace.DEFAULT_REPEATS,
    show_default=True,
    help="Runs of each, interleaved.",
)
@json_option
def bench_trace_cmd(n: int, sweep: str, repeats: int, json_path: str | None) -> None:
    """Slowdown under `vmm trace` and `strace -f`: the exit loop, and a 4K conversion sweep (nested)."""
    result = bench_trace.run_trace_bench(n, parse_size(sweep), repeats)
    click.echo(bench_trace.format_table(result))
    write_figures(json_path, result)


@bench.command("paging")
@click.option("--size", default="4M", show_default=True, help="Memory each vCPU touches (multiple of 2M).")
@click.option(
    "--c-test",
    default=None,
    metavar="PATH",
    help="The kernel's demand_paging_test [default: ~/.cache/vmm/kselftests/demand_paging_test].",
)
@click.option(
    "--calls", type=click.IntRange(1), default=200, show_default=True, help="Attribute flips per range count."
)
@click.option("--skip", multiple=True, type=click.Choice((*bench_paging.IMPLS, "attributes")), help="Leave a part out.")
@json_option
@click.option(
    "--plot", "plot_path", default=None, metavar="FILE", help="Draw the curves to this SVG (needs matplotlib)."
)
def bench_paging_cmd(
    size: str, c_test: str | None, calls: int, skip: tuple[str, ...], json_path: str | None, plot_path: str | None
) -> None:
    """Demand paging: memory attributes vs userfaultfd, Python vs C, 1/2/4 vCPUs, 4K vs 2M (needs private memory)."""
    if plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            fail("--plot needs matplotlib: pip install 'vmm-gmem[plot]'")
    per = parse_size(size)
    if per <= 0 or per % HUGE_PAGE_SIZE:
        fail(f"--size {size} is not a positive multiple of 2M")
    try:
        result = bench_paging.run_paging_bench(per, Path(c_test).expanduser() if c_test else None, calls, skip)
    except VmmError as e:
        fail(str(e))
    click.echo(bench_paging.format_table(result))
    write_figures(json_path, result)
    if plot_path:
        bench_paging.plot(result, plot_path)
        click.echo(f"wrote {plot_path}")
