"""`vmm bench conversions`: private<->shared conversions at 4K and 2M granularity, exits per
converted MiB, peak allocation with and without discard, and the kernel's own
private_mem_conversions_test against vmm's port of it, measured in one run.

Needs KVM_X86_SW_PROTECTED_VM, so in practice it runs in the nested test kernel
(`vmm nested --command "python -m vmm bench conversions ..."`, or scripts/bench-nested).

1. Guest-driven sweeps (guest/convert_sweep.S): one vCPU converts [4 GiB, +size) to private and
   back to shared with one KVM_HC_MAP_GPA_RANGE hypercall per unit (4K, then 2M with the
   PAGE_SZ_2M hint); vmm's PrivateMemoryHandlers serve each exit (KVM_SET_MEMORY_ATTRIBUTES, then
   PUNCH_HOLE of the side no longer used). The guest never touches the data, so the figures are
   the conversion path itself: exit + handler + ioctl + discard. Only the run loop is timed.
   "Converted" counts both directions, so a 1 GiB sweep converts 2 GiB. A 4K sweep smaller than
   --size (--size-4k, for slow hosts such as TCG) has its exit count scaled to --size, and says so.
2. Peak allocation: a host-driven sweep of a populated region (every shared page written,
   preallocate=True like the kernel test's fallocate pass) to private and back, sampling
   shared (memfd st_blocks) + private (/proc/meminfo Unevictable growth) bytes, with discard on
   (what vmm does) and off (the double allocation discard prevents).
3. C test vs port: wall time of the C private_mem_conversions_test binary (a subprocess, default
   arguments: 1 vCPU, 1 memslot) and of `run_conversions(kvm, 1, 1)` from
   selftests/test_private_mem_conversions.py (VM set-up and guest_image.load included, as the C side's
   exec and VM set-up are), after one untimed warm-up run of each, interleaved (order swapped
   each round); medians.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from vmm.errors import VmmError
from vmm.guest import GuestImage, load_guest
from vmm.guest.layout import DATA_GPA
from vmm.guest.machine import Machine
from vmm.guest.ucall import Ucall, UcallCmd
from vmm.kvm.caps import PRIVATE_MEM_REASON, private_memory
from vmm.kvm.system import Kvm
from vmm.kvm.uapi import ExitReason, VmType
from vmm.memory.convert import ConversionPolicy, Granularity, sweep
from vmm.memory.regions import HUGE_PAGE_SIZE, PAGE_SIZE, Backing
from vmm.paths import CHECKOUT, cache_dir
from vmm.tools.units import human_size

from .common import host_info

GUEST = "convert_sweep"
BASE = DATA_GPA  # the data region, as in private_mem_conversions_test
MiB = 1 << 20
DEFAULT_SIZE = 1 << 30
DEFAULT_PEAK_SIZE = 256 << 20
DEFAULT_REPEATS = 5
DEFAULT_TIMEOUT = 3600.0
UNITS = (("4K", PAGE_SIZE), ("2M", HUGE_PAGE_SIZE))
TARGET_EXIT_RATIO = 100.0  # 2M needs at least this many times fewer exits than 4K
TARGET_PORT_RATIO = 1.5  # our port's wall time within this factor of the C test's
PEAK_SAMPLES = 256  # accounting reads per peak sweep
PARTS = ("sweeps", "peak", "compare")
_HYPERCALL = int(ExitReason.HYPERCALL)


def default_c_test() -> Path:
    """Where scripts/build-kernel-selftests installs the C test."""
    return cache_dir() / "kselftests" / "private_mem_conversions_test"


def progress(text: str) -> None:
    """Progress on stderr (runs take minutes under TCG); the table goes to stdout."""
    print(f"bench conversions: {text}", file=sys.stderr, flush=True)


def require_private_memory(kvm: Kvm) -> None:
    """Refuse to run where there is no KVM_X86_SW_PROTECTED_VM, pointing at the nested kernel."""
    if not private_memory(kvm):
        raise VmmError(
            f"this host's KVM lacks {PRIVATE_MEM_REASON}: run the benchmark in the nested test kernel "
            "(scripts/bench-nested, or vmm nested --command 'python -m vmm bench conversions')"
        )


# --- 1. guest-driven sweeps ----------------------------------------------------------------


def run_sweep(kvm: Kvm, image: GuestImage, size: int, unit: int, timeout: float) -> dict:
    """One guest-driven sweep of [BASE, +size) in ``unit`` steps, to private and back."""
    granularity = Granularity.HUGE if unit % HUGE_PAGE_SIZE == 0 else Granularity.EXACT
    policy = ConversionPolicy(granularity=granularity)  # discard on: what vmm does
    with Machine(kvm=kvm, vm_type=VmType.SW_PROTECTED, policy=policy) as m:
        m.add_private_memory(BASE, size)
        m.load(image, arg=BASE)
        assert m.allocator is not None and m.converter is not None
        m.memory.write(m.allocator.next, struct.pack("<QQ", size, unit))  # rdx: first free GPA
        conv, counts, run = m.converter, m.runners[0].exit_counts, m.run
        phases = []
        for stage, to_private in ((1, True), (2, False)):
            conversions, hypercalls, exits = conv.stats.conversions, counts[_HYPERCALL], sum(counts)
            start, cpu_start = time.perf_counter(), time.thread_time()
            uc = run(timeout=timeout)
            cpu_seconds, seconds = time.thread_time() - cpu_start, time.perf_counter() - start
            if not (isinstance(uc, Ucall) and uc.cmd == UcallCmd.SYNC and uc.args[0] == stage):
                raise VmmError(f"{GUEST}: expected GUEST_SYNC({stage}), got {uc}")
            if conv.is_private(BASE, size) is not to_private:
                want = "private" if to_private else "shared"
                raise VmmError(f"{GUEST}: after stage {stage} the data is not all {want}")
            phases.append(
                {
                    "to": "private" if to_private else "shared",
                    "seconds": seconds,
                    "cpu_seconds": cpu_seconds,
                    "conversions": conv.stats.conversions - conversions,
                    "hypercall_exits": counts[_HYPERCALL] - hypercalls,
                    "exits": sum(counts) - exits,
                }
            )
        uc = run(timeout=timeout)
        if not (isinstance(uc, Ucall) and uc.cmd == UcallCmd.DONE):
            raise VmmError(f"{GUEST}: expected GUEST_DONE, got {uc}")
        rejected = m.handlers.counts.rejected_hypercalls  # type: ignore[attr-defined]
    if rejected:
        raise VmmError(f"{GUEST}: {rejected} hypercalls rejected")
    seconds = sum(float(p["seconds"]) for p in phases)
    conversions = sum(int(p["conversions"]) for p in phases)
    hypercalls = sum(int(p["hypercall_exits"]) for p in phases)
    converted_mib = 2 * size / MiB
    return {
        "size": size,
        "unit": unit,
        "seconds": seconds,
        "cpu_seconds": sum(p["cpu_seconds"] for p in phases),
        "conversions": conversions,
        "converted_bytes": 2 * size,
        "conversions_per_s": conversions / seconds,
        "mib_per_s": converted_mib / seconds,
        "us_per_conversion": seconds * 1e6 / conversions,
        "hypercall_exits": hypercalls,
        "exits_per_mib": hypercalls / converted_mib,
        "phases": phases,
    }


def sweep_summary(runs: list[dict], size: int) -> dict:
    """The median run (by wall time) of one unit, with its exit count scaled to ``size`` if smaller."""
    med = sorted(runs, key=lambda r: r["seconds"])[(len(runs) - 1) // 2]
    out = {k: v for k, v in med.items() if k != "phases"}
    out["seconds_median"] = statistics.median(r["seconds"] for r in runs)
    out["runs"] = runs
    out["hypercall_exits_for_size"] = round(med["exits_per_mib"] * 2 * size / MiB)
    out["exits_extrapolated"] = med["size"] != size  # measured on a smaller sweep, scaled linearly
    return out


# --- 2. peak allocation ----------------------------------------------------------------------


def populated(kvm: Kvm, size: int, policy: ConversionPolicy) -> Machine:
    """A SW_PROTECTED VM whose [BASE, +size) is all shared and all written (fully allocated)."""
    m = Machine(kvm=kvm, vm_type=VmType.SW_PROTECTED, policy=policy)
    try:
        m.add_memory(BASE, size, Backing.GUEST_MEMFD)
        m.memory.fill(BASE, size, 0x5A)
    except BaseException:
        m.close()
        raise
    return m


def run_peak(kvm: Kvm, size: int, unit: int, discard: bool) -> dict:
    """Peak shared + private bytes over a populated to-private-and-back sweep."""
    granularity = Granularity.HUGE if unit % HUGE_PAGE_SIZE == 0 else Granularity.EXACT
    policy = ConversionPolicy(granularity=granularity, preallocate=True, discard=discard)
    with populated(kvm, size, policy) as m:
        conv = m.converter
        assert conv is not None
        start_bytes = conv.shared_allocated() + conv.private_allocated()
        peak_private, t_private = sweep(conv, BASE, size, unit, to_private=True, samples=PEAK_SAMPLES)
        shared_after_private, private_after_private = conv.shared_allocated(), conv.private_allocated()
        peak_shared, t_shared = sweep(conv, BASE, size, unit, to_private=False, samples=PEAK_SAMPLES)
        shared_end, private_end = conv.shared_allocated(), conv.private_allocated()
    conversions = 2 * (size // unit)
    peak = max(peak_private, peak_shared)
    return {
        "size": size,
        "unit": unit,
        "discard": discard,
        "start_bytes": start_bytes,
        "peak_bytes": peak,
        "peak_over_size": peak / size,
        "peak_to_private_bytes": peak_private,
        "peak_to_shared_bytes": peak_shared,
        "after_to_private": {"shared": shared_after_private, "private": private_after_private},
        "after_to_shared": {"shared": shared_end, "private": private_end},
        "conversions": conversions,
        "convert_seconds": t_private + t_shared,
        "host_conversions_per_s": conversions / (t_private + t_shared),
    }


# --- 3. the C test against our port ----------------------------------------------------------


def load_port() -> Callable[[Kvm, int, int], None]:
    """run_conversions from the port of private_mem_conversions_test in this checkout's selftests."""
    path = CHECKOUT / "selftests" / "kvm" / "x86" / "test_private_mem_conversions.py"
    if not path.is_file():
        raise VmmError(f"{path} not found: the comparison needs a vmm checkout")
    spec = importlib.util.spec_from_file_location("vmm_bench_port_private_mem_conversions", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run_conversions


def run_c_test(binary: Path) -> dict:
    """One run of the C test, timed around the subprocess (exec and VM set-up included)."""
    start = time.perf_counter()
    proc = subprocess.run([str(binary)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    if proc.returncode == 4:
        raise VmmError(f"{binary.name} skipped (KTAP exit 4): {' / '.join(tail)}")
    if proc.returncode:
        raise VmmError(f"{binary.name} failed with exit status {proc.returncode}: {' / '.join(tail)}")
    return {"impl": "c", "seconds": seconds}


def run_port(kvm: Kvm, port: Callable[[Kvm, int, int], None]) -> dict:
    """One run of our port, timed around run_conversions (VM set-up included, imports not)."""
    start = time.perf_counter()
    port(kvm, 1, 1)
    return {"impl": "python", "seconds": time.perf_counter() - start}


def run_compare(kvm: Kvm, binary: Path, repeats: int) -> dict:
    """The C private_mem_conversions_test against our port: medians of interleaved runs."""
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise VmmError(
            f"C test {binary} not found: build it with scripts/build-kernel-selftests "
            "(or pass --c-test PATH, or --skip compare)"
        )
    port = load_port()
    # one untimed run of each first: cold caches (in the nested kernel, every first file access
    # goes over 9p) would otherwise land on whichever runs first
    warmup = [run_c_test(binary), run_port(kvm, port)]
    runs: list[dict] = []
    for r in range(repeats):
        for impl in ("c", "python") if r % 2 == 0 else ("python", "c"):
            res = run_c_test(binary) if impl == "c" else run_port(kvm, port)
            res["round"] = r
            runs.append(res)
    c = statistics.median(x["seconds"] for x in runs if x["impl"] == "c")
    py = statistics.median(x["seconds"] for x in runs if x["impl"] == "python")
    return {
        "c_test": str(binary),
        "repeats": repeats,
        "c_seconds": c,
        "python_seconds": py,
        "ratio": py / c,
        "target_ratio": TARGET_PORT_RATIO,
        "within_target": py / c <= TARGET_PORT_RATIO,
        "runs": runs,
        "warmup": warmup,
    }


# --- the whole benchmark -----------------------------------------------------------------------


def run_conversion_bench(
    size: int = DEFAULT_SIZE,
    size_4k: int | None = None,
    peak_size: int = DEFAULT_PEAK_SIZE,
    repeats: int = DEFAULT_REPEATS,
    sweep_repeats: int = 1,
    c_test: Path | None = None,
    skip: tuple[str, ...] = (),
    timeout: float = DEFAULT_TIMEOUT,
    checkpoint: Callable[[dict], None] | None = None,
) -> dict:
    """Run the parts not in ``skip``; the result dict ``format_table`` prints and --json writes.
    ``checkpoint`` gets the result so far after each part ("complete" is False until the end)."""
    size_4k = size if size_4k is None else size_4k
    for name, value, align in (
        ("size", size, HUGE_PAGE_SIZE),
        ("size-4k", size_4k, PAGE_SIZE),
        ("peak-size", peak_size, HUGE_PAGE_SIZE),
    ):
        if value <= 0 or value % align:
            raise VmmError(f"--{name} {value:#x} is not a positive multiple of {align >> 10} KiB")
    if repeats < 1 or sweep_repeats < 1:
        raise VmmError("--repeats and --sweep-repeats must be at least 1")
    result: dict = {
        "benchmark": "private-conversions",
        "size": size,
        "size_4k": size_4k,
        "nested": os.environ.get("VMM_NESTED") == "1",
        "complete": False,
        "host": host_info(),
    }
    save = checkpoint or (lambda _: None)
    with Kvm() as kvm:
        require_private_memory(kvm)
        # a VM with a vCPU of our own stays open throughout, so KVM's static keys stay put (the
        # int3 text-patching race under TCG: see ANCHOR_PY in vmm/tools/nested/init.py)
        with kvm.create_vm() as pin, pin.create_vcpu(0):
            _run_parts(kvm, result, size, size_4k, peak_size, repeats, sweep_repeats, c_test, skip, timeout, save)
    result["host"]["loadavg_end"] = list(os.getloadavg())
    result["complete"] = True
    save(result)
    return result


def _run_parts(
    kvm: Kvm,
    result: dict,
    size: int,
    size_4k: int,
    peak_size: int,
    repeats: int,
    sweep_repeats: int,
    c_test: Path | None,
    skip: tuple[str, ...],
    timeout: float,
    save: Callable[[dict], None],
) -> None:
    """The parts of run_conversion_bench, filling ``result`` and saving after each."""
    if "sweeps" not in skip:
        image = load_guest(GUEST)
        sweeps = {}
        for label, unit in UNITS:
            n = size_4k if unit == PAGE_SIZE else size
            runs = []
            for i in range(sweep_repeats):
                progress(f"{label} guest-driven sweep of {n / MiB:.0f} MiB, run {i + 1}/{sweep_repeats}")
                runs.append(run_sweep(kvm, image, n, unit, timeout))
                progress(f"  {runs[-1]['seconds']:.1f} s, {runs[-1]['hypercall_exits']} hypercall exits")
            sweeps[label] = sweep_summary(runs, size)
        ratio = sweeps["4K"]["exits_per_mib"] / sweeps["2M"]["exits_per_mib"]
        result["sweeps"] = sweeps
        result["exit_ratio_4k_over_2m"] = ratio
        result["target_exit_ratio"] = TARGET_EXIT_RATIO
        result["exit_ratio_within_target"] = ratio >= TARGET_EXIT_RATIO
        save(result)
    if "peak" not in skip:
        peaks = []
        for discard in (True, False):
            progress(
                f"peak: populated {peak_size / MiB:.0f} MiB, 2M host-driven sweep, discard {'on' if discard else 'off'}"
            )
            peaks.append(run_peak(kvm, peak_size, HUGE_PAGE_SIZE, discard))
        result["peak"] = peaks
        save(result)
    if "compare" not in skip:
        binary = c_test or default_c_test()
        progress(f"C test {binary} vs our port, {repeats} runs each")
        result["compare"] = run_compare(kvm, binary, repeats)
        save(result)


def format_table(result: dict) -> str:
    """A small human summary of ``run_conversion_bench``'s result."""
    host = result["host"]
    lines = [] if result.get("complete", True) else ["PARTIAL result: the run stopped before every part finished"]
    lines += [
        f"private<->shared conversions on KVM_X86_SW_PROTECTED_VM{' (nested test kernel)' if result['nested'] else ''}",
        f"host: {host['kernel']} {host['machine']}, {host['cpu'] or 'unknown CPU'}, {host['cpus']} CPUs",
    ]
    sweeps = result.get("sweeps")
    if sweeps:
        lines += [
            f"guest-driven MAP_GPA_RANGE sweeps, to private and back (converted = 2 x size); median of "
            f"{len(sweeps['2M']['runs'])} run(s)",
            f"{'unit':6}{'size':>10}{'seconds':>10}{'conv/s':>11}{'MiB/s':>10}{'µs/conv':>9}{'exits':>10}"
            f"{'exits/MiB':>11}{'exits for ' + human_size(result['size']):>20}",
        ]
        for label in ("4K", "2M"):
            s = sweeps[label]
            for_size = f"{s['hypercall_exits_for_size']:,}" + (" (extrap.)" if s["exits_extrapolated"] else "")
            lines.append(
                f"{label:6}{human_size(s['size']):>10}{s['seconds']:10.2f}{s['conversions_per_s']:11.0f}"
                f"{s['mib_per_s']:10.1f}{s['us_per_conversion']:9.1f}{s['hypercall_exits']:10,}"
                f"{s['exits_per_mib']:11.2f}{for_size:>20}"
            )
        verdict = "within target" if result["exit_ratio_within_target"] else "BELOW target"
        lines.append(
            f"exits 4K/2M: {result['exit_ratio_4k_over_2m']:.0f}x fewer with 2M "
            f"(target >= {result['target_exit_ratio']:.0f}x: {verdict})"
        )
        if sweeps["4K"]["exits_extrapolated"]:
            lines.append(
                f"note: the 4K sweep covered {human_size(sweeps['4K']['size'])}; its exits for "
                f"{human_size(result['size'])} are scaled linearly (one exit per 4K page each way)"
            )
    peaks = result.get("peak")
    if peaks:
        lines.append(
            f"peak allocation, populated {human_size(peaks[0]['size'])} swept to private and back "
            f"in 2M host-driven steps (preallocate), shared + private:"
        )
        lines.append(
            f"{'discard':9}{'peak':>12}{'x size':>8}{'after ->private (sh/pr)':>26}"
            f"{'after ->shared (sh/pr)':>25}{'conv/s':>9}"
        )
        for p in peaks:
            ap, ash = p["after_to_private"], p["after_to_shared"]
            lines.append(
                f"{'on' if p['discard'] else 'off':9}{human_size(p['peak_bytes']):>12}{p['peak_over_size']:8.2f}"
                f"{human_size(ap['shared']) + ' / ' + human_size(ap['private']):>26}"
                f"{human_size(ash['shared']) + ' / ' + human_size(ash['private']):>25}"
                f"{p['host_conversions_per_s']:9.0f}"
            )
    cmp = result.get("compare")
    if cmp:
        lines.append(
            f"private_mem_conversions_test (1 vCPU, 1 memslot), wall time, {cmp['repeats']} runs each "
            "after a warm-up, interleaved"
        )
        lines.append(f"{'':22}{'median':>9}{'min':>9}{'max':>9}")
        for impl, label in (("c", "C (kernel selftest)"), ("python", "vmm port")):
            xs = [x["seconds"] for x in cmp["runs"] if x["impl"] == impl]
            lines.append(f"{label:22}{cmp[impl + '_seconds']:9.3f}{min(xs):9.3f}{max(xs):9.3f}")
        verdict = "within target" if cmp["within_target"] else "ABOVE target"
        lines.append(f"ratio port/C: {cmp['ratio']:.2f} (target <= {cmp['target_ratio']:.1f}: {verdict})")
    return "\n".join(lines)


def within_targets(result: dict) -> bool:
    """False when a measured part missed its target (skipped parts do not count)."""
    ok = result.get("exit_ratio_within_target", True)
    return bool(ok and result.get("compare", {}).get("within_target", True))
