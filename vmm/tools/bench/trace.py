"""`vmm bench trace`: what tracing costs. The same workload untraced, under `vmm trace` and under
`strace -f`, interleaved (order reversed every other round), each traced run writing its text to a
file; the medians of the workload's own loop time give the slowdowns.

1. exits: the C exit loop of `vmm bench exits` (bench/exit_loop.c: one KVM_RUN per exit, the
   bench_exits guest); it times its own KVM_RUN loop, so start-up and set-up are left out.
2. sweep (needs private memory, so nested): vmm's guest-driven 4K conversion sweep of `vmm bench
   conversions` (one MAP_GPA_RANGE exit, KVM_SET_MEMORY_ATTRIBUTES and a PUNCH_HOLE per page), run
   by this module as a child (``python -m vmm.tools.bench.trace sweep SIZE``) that prints its loop time.

strace sees every syscall as vmm trace does (both stop twice per syscall); it decodes less: no
exits, no memslot v2, no guest_memfd structs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vmm.errors import VmmError
from vmm.guest import load_guest
from vmm.guest.machine import DEFAULT_MEM_SIZE
from vmm.kvm.caps import private_memory
from vmm.kvm.system import Kvm

from . import exits as bench_exits
from .common import host_info, interleaved, median

IMPLS = ("untraced", "vmm-trace", "strace")
DEFAULT_EXITS = 20_000
DEFAULT_SWEEP = 1 << 20
DEFAULT_REPEATS = 3


def _wrap(impl: str, command: list[str], log: str) -> list[str]:
    if impl == "vmm-trace":
        return [sys.executable, "-m", "vmm", "trace", "-o", log, "--", *command]
    if impl == "strace":
        return ["strace", "-f", "-o", log, *command]
    return command


def _run(impl: str, command: list[str], log: str) -> dict:
    """One run; the workload's own JSON line (its loop time), plus the lines the tracer wrote."""
    start = time.perf_counter()
    proc = subprocess.run(_wrap(impl, command, log), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise VmmError(f"{impl} run of {command[0]} failed: {proc.stderr.strip()[-300:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    lines = 0
    if impl != "untraced":
        with open(log, "rb") as f:
            lines = sum(1 for _ in f)
    return {
        "seconds": result["seconds"],
        "cpu_seconds": result["cpu_seconds"],
        "command_seconds": wall,
        "log_lines": lines,
    }


def _compare(name: str, command: list[str], repeats: int, work: int, unit: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="vmm-bench-trace.") as tmp:
        runs = interleaved(repeats, IMPLS, lambda impl: _run(impl, command, os.path.join(tmp, impl + ".log")))
        excerpts = {impl: _excerpt(Path(tmp) / f"{impl}.log", name) for impl in IMPLS[1:]}
    base = median(runs, "untraced", "seconds")
    out: dict = {"workload": name, "command": command, unit: work, "runs": runs, "excerpts": excerpts}
    for impl in IMPLS:
        sec = median(runs, impl, "seconds")
        cpu, whole = median(runs, impl, "cpu_seconds"), median(runs, impl, "command_seconds")
        out[impl] = {
            "seconds": sec,
            "us_per_" + unit.rstrip("s"): sec * 1e6 / work,
            "slowdown": sec / base,
            "cpu_seconds": cpu,  # the workload thread's CPU time (guest included): steadier on a busy host
            "cpu_slowdown": cpu / median(runs, "untraced", "cpu_seconds"),
            "command_seconds": whole,  # the whole command, start-up and tracer start-up included
        }
    out["vmm_over_strace"] = out["vmm-trace"]["seconds"] / out["strace"]["seconds"]
    return out


def _excerpt(log: Path, name: str, n: int = 6) -> list[str]:
    """A few lines of one traced operation: an exit's KVM_RUN, or one page's conversion."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    key = "MAP_GPA_RANGE" if name == "sweep" else "KVM_EXIT_IO"
    strace_key = "KVM_SET_MEMORY_ATTRIBUTES" if name == "sweep" else "KVM_RUN"
    for i, line in enumerate(lines):
        if key in line and "vmm trace" not in line:  # vmm trace's line names the exit
            return lines[i : i + n]
    for i, line in enumerate(lines):  # strace's: find the operation by the ioctl it shows
        if strace_key in line or ("0xd2" in line and name == "sweep"):
            back = 1 if name == "sweep" else 0  # the KVM_RUN that returned the hypercall exit
            return lines[max(0, i - back) : i + n - back]
    return lines[-n:]


def run_trace_bench(exits: int = DEFAULT_EXITS, sweep: int = DEFAULT_SWEEP, repeats: int = DEFAULT_REPEATS) -> dict:
    """Both workloads (the sweep only where private memory exists), untraced vs vmm trace vs strace -f."""
    if shutil.which("strace") is None:
        raise VmmError("strace not found: it is the reference of this benchmark (scripts/setup installs it)")
    binary = bench_exits.c_binary()
    image = load_guest(bench_exits.GUEST)
    result: dict = {"benchmark": "trace-overhead", "repeats": repeats, "host": host_info(), "workloads": []}
    with tempfile.NamedTemporaryFile(prefix="bench_exits.", suffix=".bin") as f:
        f.write(image.binary)
        f.flush()
        cmd = [str(binary), f.name, str(exits), str(DEFAULT_MEM_SIZE)]
        result["workloads"].append(_compare("exits", cmd, repeats, exits + 1, "exits"))
    with Kvm() as kvm:
        private = private_memory(kvm)
    if private:
        cmd = [sys.executable, "-m", "vmm.tools.bench.trace", "sweep", str(sweep)]
        result["workloads"].append(_compare("sweep", cmd, repeats, 2 * sweep // 4096, "conversions"))
    else:
        result["skipped"] = "sweep: needs KVM_X86_SW_PROTECTED_VM (run inside `vmm nested`)"
    return result


def format_table(result: dict) -> str:
    """The figures and the two excerpts, side by side in turn."""
    lines = [f"tracing overhead, {result['repeats']} interleaved runs each, medians of the workload's own loop time"]
    for w in result["workloads"]:
        unit = "exit" if w["workload"] == "exits" else "conversion"
        n = w.get("exits") or w.get("conversions")
        lines.append(f"{w['workload']}: {n} {unit}s")
        for impl in IMPLS:
            r = w[impl]
            lines.append(
                f"  {impl:10} {r['seconds']:9.4f}s {r['us_per_' + unit]:9.2f} µs/{unit}  x{r['slowdown']:.2f} wall, "
                f"x{r['cpu_slowdown']:.2f} cpu; whole command {r['command_seconds']:.2f}s"
            )
        lines.append(f"  vmm trace / strace -f: {w['vmm_over_strace']:.2f}")
        for impl in IMPLS[1:]:
            lines.append(f"  {impl} output:")
            lines += [f"    {ln[:150]}" for ln in w["excerpts"][impl]]
    if "skipped" in result:
        lines.append(f"skipped {result['skipped']}")
    return "\n".join(lines)


def _sweep_child(size: int) -> None:
    """The traced workload: one 4K guest-driven sweep, its loop time as one JSON line."""
    from .conversions import run_sweep

    with Kvm() as kvm:
        r = run_sweep(kvm, load_guest("convert_sweep"), size, 4096, 600.0)
    print(json.dumps({k: r[k] for k in ("seconds", "cpu_seconds", "conversions")}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["sweep"]:
        _sweep_child(int(sys.argv[2]))
