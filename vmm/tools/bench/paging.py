"""`vmm bench paging`: demand paging on memory attributes (KVM_EXIT_MEMORY_FAULT, then
KVM_SET_MEMORY_ATTRIBUTES) against userfaultfd (MISSING, UFFDIO_COPY), in Python and in C.

1. Paging rate, for 1, 2 and 4 vCPUs and 4K vs 2M fetches; every side runs a guest that touches
   every page of its per-vCPU region once (the C test's memstress guest; vmm's and the C pager's
   is guest/demand_paging.S, which also checks each page), and the figure is the time from the
   first entry to the last vCPU's end:
     attr-py        vmm.memory.paging.DemandPager (guard off: the mechanism alone)
     attr-py-guard  the same with its userfaultfd guard registered (what vmm boot uses)
     uffd-py        vmm.memory.uffd_paging.UffdPager, one userfaultfd and reader thread per vCPU
     attr-c         bench/attr_pager.c, the attribute pager without Python
     uffd-c         the kernel's demand_paging_test -u MISSING (-s shmem for 4K, anonymous_thp
                    for 2M: its fetch unit is the backing's page size)
   pages/s counts 4K pages over all vCPUs; µs/fault is a vCPU's wall time per fetched unit.
2. KVM_SET_MEMORY_ATTRIBUTES per call as the number of distinct attribute ranges grows (n = 1 to
   131,072 private 4K pages 8K apart over 1 GiB: 2 to 262,144 ranges), from C (bench/attr_pager.c
   --attributes: building, a 4K flip, one call clearing all 1 GiB) and from Python (a 4K flip),
   each against a null ioctl (KVM_CHECK_EXTENSION) from the same loop.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from vmm.errors import VmmError
from vmm.guest import Machine, demand, load_guest
from vmm.guest.demand import PAGED_GPA
from vmm.kvm.caps import PRIVATE_MEM_REASON, private_memory
from vmm.kvm.system import Kvm
from vmm.kvm.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE, Cap, VmType
from vmm.memory import HUGE_PAGE_SIZE, PAGE_SIZE
from vmm.memory.paging import PageSource
from vmm.memory.uffd_paging import UffdPager
from vmm.paths import CHECKOUT, cache_dir

from .common import host_info

IMPLS = ("attr-py", "attr-py-guard", "uffd-py", "attr-c", "uffd-c")
VCPUS = (1, 2, 4)
UNITS = (("4K", PAGE_SIZE), ("2M", HUGE_PAGE_SIZE))
RANGE_POINTS = (1, 16, 256, 4096, 32768, 131072)
ATTR_SPAN = 1 << 30
SEED = 0x5EED  # bench/attr_pager.c's
TIMEOUT = 600.0


def progress(text: str) -> None:
    """Progress on stderr; the table goes to stdout."""
    print(f"bench paging: {text}", file=sys.stderr, flush=True)


def default_c_test() -> Path:
    """Where scripts/build-kernel-selftests installs the kernel's demand_paging_test (6.12)."""
    return cache_dir() / "kselftests" / "demand_paging_test"


def c_pager() -> Path:
    """bench/build/attr_pager (`make bench/build/attr_pager`)."""
    return CHECKOUT / "bench" / "build" / "attr_pager"


def _figures(vcpus: int, size: int, unit: int, seconds: float) -> dict:
    return {
        "seconds": seconds,
        "pages_per_s": size / PAGE_SIZE / seconds,
        "us_per_fault": seconds * 1e6 * vcpus / (size // unit),
    }


def run_py(kvm: Kvm, impl: str, vcpus: int, per: int, unit: int) -> dict:
    """One run of a Python pager; only run_all() is timed."""
    size = vcpus * per
    data = demand.pattern(PAGED_GPA, size, SEED)
    attributes = impl.startswith("attr")
    vm_type = VmType.SW_PROTECTED if attributes else VmType.DEFAULT
    with Machine(kvm=kvm, vcpus=vcpus, vm_type=vm_type, output=lambda i, t: None) as m:
        source = PageSource.from_bytes(data)
        pager = None
        if attributes:
            pager = m.add_demand_paged_memory(PAGED_GPA, size, source, fetch=unit, guard=impl.endswith("guard"))
        else:
            m.add_memory(PAGED_GPA, size)
        params = demand.params_gpa(m.memory)
        m.load(load_guest(demand.GUEST), arg=params)
        demand.write_params(m.memory, params, PAGED_GPA, per, SEED, write=True)
        with UffdPager(m.memory, PAGED_GPA, size, source, fetch=unit, handlers=vcpus) if not attributes else _null():
            start = time.perf_counter()
            m.run_all(timeout=TIMEOUT)
            seconds = time.perf_counter() - start
        if m.memory.read(PAGED_GPA, size) != data:
            raise VmmError(f"{impl}: guest memory differs from the page source")
        extra = {"faults": pager.stats.faults, "stale": pager.stats.stale_faults} if pager else {}
    return _figures(vcpus, size, unit, seconds) | extra


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def run_attr_c(binary: Path, vcpus: int, per: int, unit: int) -> dict:
    """One run of bench/attr_pager.c (its own JSON line)."""
    image = CHECKOUT / "guest" / "build" / f"{demand.GUEST}.bin"
    proc = subprocess.run([str(binary), str(image), str(vcpus), str(per), str(unit)], capture_output=True, text=True)
    if proc.returncode:
        raise VmmError(f"{binary.name}: {proc.stderr.strip() or proc.returncode}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return _figures(vcpus, vcpus * per, unit, r["seconds"]) | {"faults": r["faults"], "stale": r["stale"]}


def run_uffd_c(binary: Path, vcpus: int, per: int, unit: int) -> dict:
    """One run of the kernel's demand_paging_test -u MISSING; its "Total guest execution time"."""
    src = "shmem" if unit == PAGE_SIZE else "anonymous_thp"
    args = [str(binary), "-u", "MISSING", "-v", str(vcpus), "-b", str(per), "-s", src]
    proc = subprocess.run(args, capture_output=True, text=True)
    m = re.search(r"Total guest execution time:\s*(\d+)\.(\d+)s", proc.stdout)
    if proc.returncode or not m:
        raise VmmError(f"{' '.join(args)}: exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}")
    return _figures(vcpus, vcpus * per, unit, int(m[1]) + int(m[2]) / 1e9)


def attribute_costs_c(binary: Path, calls: int) -> dict[int, dict]:
    """bench/attr_pager.c --attributes: per private-page count, µs per call building, per 4K
    flip (median), for one call clearing the whole 1 GiB, and a null ioctl's."""
    args = [str(binary), "--attributes", str(calls), *map(str, RANGE_POINTS)]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode:
        raise VmmError(f"{binary.name} --attributes: {proc.stderr.strip() or proc.returncode}")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["private_pages"]: r for r in rows}


def attribute_costs(kvm: Kvm, calls: int) -> list[dict]:
    """The C figures (attribute_costs_c) and the same 4K flip from Python, with the null ioctl of
    the same Python loop: n private 4K pages 8K apart over a 1 GiB memslot, n in RANGE_POINTS."""
    try:
        c = attribute_costs_c(c_pager(), calls)
    except (VmmError, OSError) as e:
        progress(f"attributes in C: {e}")
        c = {}
    out = []
    with Machine(kvm=kvm, vm_type=VmType.SW_PROTECTED, output=lambda i, t: None) as m:
        m.add_memory(PAGED_GPA, ATTR_SPAN)
        vm, built = m.vm, 0
        for n in RANGE_POINTS:
            for i in range(built, n):
                vm.set_memory_attributes(PAGED_GPA + 2 * i * PAGE_SIZE, PAGE_SIZE, KVM_MEMORY_ATTRIBUTE_PRIVATE)
            built = n
            flips, nulls = [], []
            for k in range(calls):
                gpa = PAGED_GPA + (2 * (k * 7919 % n) + 1) * PAGE_SIZE  # a shared page between private ones
                t0 = time.perf_counter()
                vm.set_memory_attributes(gpa, PAGE_SIZE, KVM_MEMORY_ATTRIBUTE_PRIVATE)
                t1 = time.perf_counter()
                vm.set_memory_attributes(gpa, PAGE_SIZE, 0)
                t2 = time.perf_counter()
                vm.check_extension(Cap.USER_MEMORY)
                t3 = time.perf_counter()
                flips += [t1 - t0, t2 - t1]
                nulls.append(t3 - t2)
            row = {
                "ranges": 2 * n,  # n private pages and the shared gaps between them
                "private_pages": n,
                "py_us_per_call": statistics.median(flips) * 1e6,
                "py_us_null_ioctl": statistics.median(nulls) * 1e6,
                "c": c.get(n),
            }
            progress(f"attributes: {row}")
            out.append(row)
    return out


def run_paging_bench(
    per_vcpu: int, c_test: Path | None, calls: int, skip: tuple[str, ...], vcpu_counts: tuple[int, ...] = VCPUS
) -> dict:
    """Every (impl, vCPUs, unit) once, then the attribute-cost curve; the result dict."""
    if per_vcpu % HUGE_PAGE_SIZE or per_vcpu <= 0:
        raise VmmError(f"per-vCPU size {per_vcpu:#x}: must be a positive multiple of 2M")
    runs: list[dict] = []
    with Kvm() as kvm:
        if not private_memory(kvm):
            raise VmmError(
                f"this host's KVM lacks {PRIVATE_MEM_REASON}: run the benchmark in the nested test kernel "
                "(vmm nested --command 'python -m vmm bench paging ...')"
            )
        c_test = c_test or default_c_test()
        for label, unit in UNITS:
            for vcpus in vcpu_counts:
                for impl in IMPLS:
                    if impl in skip:
                        continue
                    try:
                        if impl == "attr-c":
                            r = run_attr_c(c_pager(), vcpus, per_vcpu, unit)
                        elif impl == "uffd-c":
                            r = run_uffd_c(c_test, vcpus, per_vcpu, unit)
                        else:
                            r = run_py(kvm, impl, vcpus, per_vcpu, unit)
                    except (VmmError, OSError) as e:
                        r = {"error": str(e)}
                    r.update(impl=impl, vcpus=vcpus, unit=label)
                    progress(json.dumps(r))
                    runs.append(r)
        costs = attribute_costs(kvm, calls) if "attributes" not in skip else []
    return {
        "benchmark": "demand-paging",
        "per_vcpu_bytes": per_vcpu,
        "runs": runs,
        "attribute_costs": costs,
        "host": host_info(),
    }


def format_table(result: dict) -> str:
    """pages/s and µs/fault per mechanism, then the attribute-cost curve."""
    per = result["per_vcpu_bytes"] >> 20
    lines = [f"demand paging: every page of {per} MiB per vCPU, {result['host']['kernel']}"]
    lines.append(f"{'':14}" + "".join(f"{f'{u} x{v}':>20}" for u, _ in UNITS for v in VCPUS))
    lines.append(f"{'pages/s | µs/fault':14}")
    for impl in IMPLS:
        cells = []
        for u, _ in UNITS:
            for v in VCPUS:
                r = next((x for x in result["runs"] if (x["impl"], x["unit"], x["vcpus"]) == (impl, u, v)), None)
                if r is None:
                    cells.append(f"{'-':>20}")
                elif "error" in r:
                    cells.append(f"{'error':>20}")
                else:
                    cells.append(f"{r['pages_per_s']:>11.0f} |{r['us_per_fault']:>7.0f}")
        lines.append(f"{impl:14}" + "".join(cells))
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"  {r['impl']} {r['unit']} x{r['vcpus']}: {r['error'][:150]}")
    if result["attribute_costs"]:
        lines.append(
            "KVM_SET_MEMORY_ATTRIBUTES, µs per call (medians; C: bench/attr_pager.c, Python: Vm.set_memory_attributes):"
        )
        heads = ("ranges", "C 4K flip", "C null", "C build", "C 1G clear", "py 4K flip", "py null")
        lines.append("".join(f"{h:>{w}}" for h, w in zip(heads, (9, 11, 8, 9, 12, 12, 9))))
        for r in result["attribute_costs"]:
            c = r["c"] or {}
            figs = [c.get(k) for k in ("us_per_call", "us_null_ioctl", "us_per_call_building", "us_clear_1g")]
            shown = [f"{v:{w}.1f}" if v is not None else f"{'-':>{w}}" for v, w in zip(figs, (11, 8, 9, 12))]
            lines.append(
                f"{r['ranges']:>9}" + "".join(shown) + f"{r['py_us_per_call']:12.1f}{r['py_us_null_ioctl']:9.1f}"
            )
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Two panels: pages/s against vCPUs per mechanism (4K solid, 2M dashed), and µs per
    KVM_SET_MEMORY_ATTRIBUTES against the number of attribute ranges."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for impl in IMPLS:
        for u, style in (("4K", "-"), ("2M", "--")):
            pts = [
                (r["vcpus"], r["pages_per_s"])
                for r in result["runs"]
                if r["impl"] == impl and r["unit"] == u and "error" not in r
            ]
            if pts:
                a.plot(*zip(*pts), style, marker="o", label=f"{impl} {u}")
    a.set(xlabel="vCPUs", ylabel="4K pages/s (all vCPUs)", yscale="log", xticks=list(VCPUS), title="demand paging rate")
    a.legend(fontsize=7)
    costs = result["attribute_costs"]
    if costs:
        xs = [r["ranges"] for r in costs]
        series = [
            ("C: one 4K flip", [(r["c"] or {}).get("us_per_call") for r in costs], "-"),
            ("C: one call clearing 1 GiB", [(r["c"] or {}).get("us_clear_1g") for r in costs], "-"),
            ("C: null ioctl (reference)", [(r["c"] or {}).get("us_null_ioctl") for r in costs], ":"),
            ("Python: one 4K flip", [r["py_us_per_call"] for r in costs], "--"),
            ("Python: null ioctl (reference)", [r["py_us_null_ioctl"] for r in costs], ":"),
        ]
        for label, ys, style in series:
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if pts:
                b.plot(*zip(*pts), style, marker="o", label=label)
        b.set(xscale="log", yscale="log", xlabel="distinct attribute ranges over 1 GiB", ylabel="µs per call")
        b.set_title("KVM_SET_MEMORY_ATTRIBUTES cost")
        b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
