"""`vmm bench exits`: the PIO ucall round trip through vmm's run loop against a minimal C KVM_RUN loop.

Both sides run the same guest (guest/bench_exits.S: N x GUEST_SYNC2(1, i), then GUEST_DONE) on the
same machine (one memfd slot at GPA 0, long mode), and both handle every exit the same way: read
the OUT's 4-byte value, fetch the 56-byte ucall block from guest memory, dispatch on cmd, check
the SYNC counter. The C side is bench/exit_loop.c; the Python side is ``Machine.run()`` (Runner.run
-> Vcpu.run -> ucall decode) in a loop. Only the run loops are timed, not VM creation. Runs
alternate C/Python (and swap order each round) so drift from other load hits both; the medians
are compared.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path

from vmm.errors import VmmError
from vmm.guest import GuestImage, load_guest
from vmm.guest.machine import DEFAULT_MEM_SIZE, Machine
from vmm.guest.ucall import Ucall, UcallCmd
from vmm.kvm.system import Kvm
from vmm.paths import CHECKOUT

from .common import host_info, interleaved, median

TARGET_RATIO = 1.10
DEFAULT_EXITS = 200_000
DEFAULT_REPEATS = 5
GUEST = "bench_exits"
BUSY_WALL_OVER_CPU = 1.15
CC_FLAGS = ["-O2", "-Wall", "-Wextra"]  # the Makefile's rule for bench/build/exit_loop


def bench_dir() -> Path:
    """bench/ of the checkout (beside vmm/)."""
    return CHECKOUT / "bench"


def c_binary() -> Path:
    """bench/build/exit_loop, compiled with ``cc`` (the Makefile's flags) when missing or stale."""
    src = bench_dir() / "exit_loop.c"
    out = bench_dir() / "build" / "exit_loop"
    newest = max((p.stat().st_mtime for p in (src, bench_dir() / "kvm_bench.h") if p.exists()), default=0.0)
    if out.exists() and out.stat().st_mtime >= newest:
        return out
    if not src.exists():
        raise VmmError(f"{src} not found: the exit benchmark needs a vmm checkout")
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["cc", *CC_FLAGS, "-o", str(out), str(src)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise VmmError("cc not found: install a C compiler (gcc) to build bench/build/exit_loop") from None
    if proc.returncode:
        first = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip()[:200])
        raise VmmError(f"building {out} failed: {first}")
    return out


def run_c(binary: Path, image_path: str, syncs: int) -> dict:
    """One run of the C loop; its own JSON line (time of its KVM_RUN loop only)."""
    proc = subprocess.run([str(binary), image_path, str(syncs), str(DEFAULT_MEM_SIZE)], capture_output=True, text=True)
    if proc.returncode:
        raise VmmError(f"{binary.name} failed: {proc.stderr.strip() or f'exit status {proc.returncode}'}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["syncs"] != syncs:
        raise VmmError(f"{binary.name}: {result['syncs']} SYNCs, expected {syncs}")
    keys = ("exits", "seconds", "us_per_exit", "cpu_seconds", "cpu_us_per_exit")
    return {k: result[k] for k in keys}


def run_python(kvm: Kvm, image: GuestImage, syncs: int) -> dict:
    """One run through Machine.run(): the loop of run() calls is timed, set-up and teardown are not."""
    with Machine(kvm=kvm) as m:
        m.load(image, arg=syncs)
        run, sync = m.run, int(UcallCmd.SYNC)  # an int: IntEnum member lookups cost ~0.1 us each
        seen = 0
        start, cpu_start = time.perf_counter(), time.thread_time()
        while True:  # the checks of exit_loop.c: a SYNC with stage 1 and the next counter value
            uc = run()
            if type(uc) is Ucall and uc.cmd == sync and uc.args[0] == 1 and uc.args[1] == seen:
                seen += 1
                continue
            break
        cpu_seconds = time.thread_time() - cpu_start
        seconds = time.perf_counter() - start
    if not (isinstance(uc, Ucall) and uc.cmd == UcallCmd.DONE) or seen != syncs:
        raise VmmError(f"python run: stopped at {uc} after {seen} of {syncs} SYNCs")
    exits = seen + 1
    return {
        "exits": exits,
        "seconds": seconds,
        "us_per_exit": seconds * 1e6 / exits,
        "cpu_seconds": cpu_seconds,
        "cpu_us_per_exit": cpu_seconds * 1e6 / exits,
    }


def run_exit_bench(exits: int = DEFAULT_EXITS, repeats: int = DEFAULT_REPEATS) -> dict:
    """Run C and Python ``repeats`` times each, interleaved; median µs/exit of each and their ratio.

    ``exits`` is the number of SYNC ucalls; each run handles ``exits + 1`` exits (the DONE too)."""
    if exits < 1 or repeats < 1:
        raise VmmError("exits and repeats must be at least 1")
    binary = c_binary()
    image = load_guest(GUEST)
    with Kvm() as kvm, tempfile.NamedTemporaryFile(prefix="bench_exits.", suffix=".bin") as f:
        f.write(image.binary)  # exactly the bytes the Python side loads
        f.flush()
        runs = interleaved(
            repeats,
            ("c", "python"),
            lambda impl: run_c(binary, f.name, exits) if impl == "c" else run_python(kvm, image, exits),
        )
    c, py = median(runs, "c", "us_per_exit"), median(runs, "python", "us_per_exit")
    c_cpu, py_cpu = median(runs, "c", "cpu_us_per_exit"), median(runs, "python", "cpu_us_per_exit")
    return {
        "benchmark": "pio-ucall-exit",
        "exits": exits + 1,
        "syncs": exits,
        "repeats": repeats,
        "python_us_per_exit": py,
        "c_us_per_exit": c,
        "ratio": py / c,
        "target_ratio": TARGET_RATIO,
        "within_target": py / c <= TARGET_RATIO,
        # the same on the running thread's CPU time (guest time included): steadier on a busy host
        "python_cpu_us_per_exit": py_cpu,
        "c_cpu_us_per_exit": c_cpu,
        "cpu_ratio": py_cpu / c_cpu,
        # wall time well above CPU time: other load preempted the loops, the wall figures are noise
        "host_busy": max(c / c_cpu, py / py_cpu) > BUSY_WALL_OVER_CPU,
        "runs": runs,
        "host": host_info(),
    }


def format_table(result: dict) -> str:
    """A small human summary of ``run_exit_bench``'s result."""
    runs = result["runs"]
    lines = [
        f"PIO ucall exit round trip: {result['exits']} exits x {result['repeats']} runs each, interleaved",
        f"host: {result['host']['kernel']} {result['host']['machine']}, {result['host']['cpu'] or 'unknown CPU'}",
        f"{'µs/exit':16}{'median':>9}{'min':>9}{'max':>9}{'cpu median':>12}",
    ]
    for impl, label in (("c", "C KVM_RUN loop"), ("python", "vmm Runner.run")):
        wall = [x["us_per_exit"] for x in runs if x["impl"] == impl]
        cpu = result[f"{impl}_cpu_us_per_exit"]
        lines.append(f"{label:16}{result[f'{impl}_us_per_exit']:9.3f}{min(wall):9.3f}{max(wall):9.3f}{cpu:12.3f}")
    verdict = "within target" if result["within_target"] else "ABOVE target"
    lines.append(
        f"ratio python/C: {result['ratio']:.3f} wall, {result['cpu_ratio']:.3f} cpu "
        f"(target <= {result['target_ratio']:.2f} wall: {verdict})"
    )
    if result["host_busy"]:
        lines.append("note: wall time exceeds CPU time by >15%: the host is busy, trust the cpu figures")
    return "\n".join(lines)
