"""`vmm bench exits`: the PIO ucall round trip through vmm's run loop, against a minimal C KVM_RUN
loop on the same guest and against the floor, a C loop over bare OUTs.

Rows, all measured in one run, interleaved (the order reversed every other round) so drift from
other load hits every row; medians are compared:
- floor (long, real): bench/exit_loop.c --floor on guest/bench_floor*.S, one `outb` per exit and
  nothing read: the cheapest exit this host's KVM can make;
- C ucall (long, real): bench/exit_loop.c on guest/bench_exits*.S (N x GUEST_SYNC2(1, i), DONE),
  reading each ucall block from guest memory and checking the SYNC counter as vmm does;
- vmm (long, real): ``Machine.run()`` (Runner.run -> Vcpu.run -> ucall decode) in a loop on the
  same guests. Only the run loops are timed, not VM creation.
The target is vmm/C on the long-mode guest.
"""

from __future__ import annotations

import fcntl
import json
import subprocess
import tempfile
import time
from pathlib import Path

from vmm.errors import VmmError
from vmm.guest import GuestImage, load_guest
from vmm.guest.machine import DEFAULT_MEM_SIZE, Machine
from vmm.guest.ucall import Ucall, UcallCmd
from vmm.kvm import uapi
from vmm.kvm.system import Kvm
from vmm.kvm.uapi import ExitReason
from vmm.paths import CHECKOUT

from .common import host_info, interleaved, median

TARGET_RATIO = 1.10
DEFAULT_EXITS = 200_000
DEFAULT_REPEATS = 5
GUEST = "bench_exits"
# row -> (guest, exit_loop flags); the vmm rows run the same guests through Machine.run()
C_ROWS = {
    "floor": ("bench_floor", ["--floor"]),
    "floor_real": ("bench_floor_real", ["--real", "--floor"]),
    "c": ("bench_exits", []),
    "c_real": ("bench_exits_real", ["--real"]),
}
PY_ROWS = {
    "python": "bench_exits",
    "python_stream": "bench_exits",
    "python_real": "bench_exits_real",
    "python_floor": "bench_floor",
}
LABELS = {
    "floor": "floor: bare OUT, C",
    "floor_real": "floor, real mode",
    "c": "ucall, C loop",
    "c_real": "ucall, C, real mode",
    "python": "ucall, vmm",
    "python_stream": "ucall, vmm on_sync",
    "python_real": "ucall, vmm, real",
    "python_floor": "floor: bare OUT, Python",
}
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


def run_c(binary: Path, image_path: str, syncs: int, flags: list[str] | None = None) -> dict:
    """One run of the C loop; its own JSON line (time of its KVM_RUN loop only)."""
    cmd = [str(binary), *(flags or []), image_path, str(syncs), str(DEFAULT_MEM_SIZE)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise VmmError(f"{binary.name} failed: {proc.stderr.strip() or f'exit status {proc.returncode}'}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["syncs"] != syncs:
        raise VmmError(f"{binary.name}: {result['syncs']} SYNCs, expected {syncs}")
    keys = ("exits", "seconds", "us_per_exit", "cpu_seconds", "cpu_us_per_exit")
    return {k: result[k] for k in keys}


def per_exit(exits: int, seconds: float, cpu_seconds: float) -> dict:
    """A run's figures as exit_loop.c prints them: totals, and µs per exit (wall and CPU)."""
    return {
        "exits": exits,
        "seconds": seconds,
        "us_per_exit": seconds * 1e6 / exits,
        "cpu_seconds": cpu_seconds,
        "cpu_us_per_exit": cpu_seconds * 1e6 / exits,
    }


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
    return per_exit(exits, seconds, cpu_seconds)


def run_python_stream(kvm: Kvm, image: GuestImage, syncs: int) -> dict:
    """One run through Runner.run_until_done(on_sync=check): the loop `vmm boot` and run_all use,
    which hands each SYNC to a callback and stays in the loop (the same checks as exit_loop.c)."""
    seen = [0]

    def check(uc: Ucall) -> None:
        if uc.args[0] != 1 or uc.args[1] != seen[0]:
            raise VmmError(f"python run: SYNC {seen[0]} came as {uc}")
        seen[0] += 1

    with Machine(kvm=kvm) as m:
        m.load(image, arg=syncs)
        start, cpu_start = time.perf_counter(), time.thread_time()
        last = m.runners[0].run_until_done(on_sync=check)
        cpu_seconds = time.thread_time() - cpu_start
        seconds = time.perf_counter() - start
    if not (isinstance(last, Ucall) and last.cmd == UcallCmd.DONE) or seen[0] != syncs:
        raise VmmError(f"python run: stopped at {last} after {seen[0]} of {syncs} SYNCs")
    exits = syncs + 1
    return per_exit(exits, seconds, cpu_seconds)


def run_python_floor(kvm: Kvm, image: GuestImage, outs: int) -> dict:
    """The floor of any Python VMM: fcntl.ioctl(KVM_RUN) in a bare loop on the bare-OUT guest, no
    exit decoded. What it costs above the C floor is the interpreter's, not vmm's."""
    with Machine(kvm=kvm) as m:
        m.load(image, arg=outs)
        fd, request, ioctl = m.vcpus[0].fd, uapi.KVM_RUN, fcntl.ioctl
        exits = outs + 1
        start, cpu_start = time.perf_counter(), time.thread_time()
        for _ in range(exits):
            ioctl(fd, request, 0)
        cpu_seconds = time.thread_time() - cpu_start
        seconds = time.perf_counter() - start
        if m.vcpus[0].kvm_run.exit_reason != ExitReason.HLT:
            raise VmmError(f"python floor: the guest did not halt after {outs} OUTs")
    return per_exit(exits, seconds, cpu_seconds)


def run_exit_bench(exits: int = DEFAULT_EXITS, repeats: int = DEFAULT_REPEATS) -> dict:
    """Run every row ``repeats`` times, interleaved; median µs/exit of each, vmm/C and C/floor.

    ``exits`` is the number of SYNC ucalls (or bare OUTs); each run handles ``exits + 1`` exits
    (the DONE or HLT too)."""
    if exits < 1 or repeats < 1:
        raise VmmError("exits and repeats must be at least 1")
    binary = c_binary()
    images = {name: load_guest(name) for name, _ in C_ROWS.values()}
    with Kvm() as kvm, tempfile.TemporaryDirectory(prefix="bench_exits.") as tmp:
        paths = {}
        for name, image in images.items():  # exactly the bytes the Python side loads
            paths[name] = Path(tmp, f"{name}.bin")
            paths[name].write_bytes(image.binary)

        def run(row: str) -> dict:
            if row in C_ROWS:
                guest, flags = C_ROWS[row]
                return run_c(binary, str(paths[guest]), exits, flags)
            if row == "python_floor":
                return run_python_floor(kvm, images[PY_ROWS[row]], exits)
            if row == "python_stream":
                return run_python_stream(kvm, images[PY_ROWS[row]], exits)
            return run_python(kvm, images[PY_ROWS[row]], exits)

        runs = interleaved(repeats, (*C_ROWS, *PY_ROWS), run)
    wall = {row: median(runs, row, "us_per_exit") for row in (*C_ROWS, *PY_ROWS)}
    cpu = {row: median(runs, row, "cpu_us_per_exit") for row in (*C_ROWS, *PY_ROWS)}
    c, py, c_cpu, py_cpu = wall["c"], wall["python"], cpu["c"], cpu["python"]
    return {
        "benchmark": "pio-ucall-exit",
        "exits": exits + 1,
        "syncs": exits,
        "repeats": repeats,
        "python_us_per_exit": py,
        "c_us_per_exit": c,
        "floor_us_per_exit": wall["floor"],
        "us_per_exit": wall,
        "cpu_us_per_exit": cpu,
        "ratio": py / c,
        "target_ratio": TARGET_RATIO,
        "within_target": py / c <= TARGET_RATIO,
        # what the ucall itself adds to a bare exit, in the C loop (stores in the guest, one read in the host)
        "c_over_floor": c / wall["floor"],
        "real_ratio": wall["python_real"] / wall["c_real"],
        # the interpreter's share: a bare fcntl.ioctl loop over the C floor
        "python_floor_ratio": wall["python_floor"] / wall["floor"],
        "stream_ratio": wall["python_stream"] / c,
        # the same on the running thread's CPU time (guest time included): steadier on a busy host
        "python_cpu_us_per_exit": py_cpu,
        "c_cpu_us_per_exit": c_cpu,
        "cpu_ratio": py_cpu / c_cpu,
        # wall time well above CPU time: other load preempted the loops, the wall figures are noise
        "host_busy": max(wall[row] / cpu[row] for row in wall) > BUSY_WALL_OVER_CPU,
        "runs": runs,
        "host": host_info(),
    }


def format_table(result: dict) -> str:
    """A small human summary of ``run_exit_bench``'s result."""
    runs, wall, cpu, floor = (
        result["runs"],
        result["us_per_exit"],
        result["cpu_us_per_exit"],
        result["floor_us_per_exit"],
    )
    lines = [
        f"PIO exit round trip: {result['exits']} exits x {result['repeats']} runs of each row, interleaved",
        f"host: {result['host']['kernel']} {result['host']['machine']}, {result['host']['cpu'] or 'unknown CPU'}",
        f"{'µs/exit':22}{'median':>9}{'min':>9}{'max':>9}{'cpu median':>12}{'x floor':>9}",
    ]
    for row, label in LABELS.items():
        times = [x["us_per_exit"] for x in runs if x["impl"] == row]
        base = wall["floor_real" if row.endswith("real") else "floor"]
        lines.append(
            f"{label:22}{wall[row]:9.3f}{min(times):9.3f}{max(times):9.3f}{cpu[row]:12.3f}{wall[row] / base:9.2f}"
        )
    verdict = "within target" if result["within_target"] else "ABOVE target"
    lines.append(
        f"ratio vmm/C: {result['ratio']:.3f} wall, {result['cpu_ratio']:.3f} cpu "
        f"(target <= {result['target_ratio']:.2f} wall: {verdict}); with on_sync {result['stream_ratio']:.3f}; "
        f"real mode {result['real_ratio']:.3f}; "
        f"C ucall / floor {result['c_over_floor']:.2f} ({floor:.2f} µs); "
        f"Python floor / C floor {result['python_floor_ratio']:.2f}"
    )
    if result["host_busy"]:
        lines.append("note: wall time exceeds CPU time by >15%: the host is busy, trust the cpu figures")
    return "\n".join(lines)
