"""`vmm bench memslots`: converting a range by memory attributes (vmm's way) against converting it by
memslot updates (the design guest_memfd rejected, vmm.memory.slotsplit), on the same ranges.

Ways, one VM each, measured interleaved (order reversed every round):
  attributes   KVM_X86_SW_PROTECTED_VM: KVM_SET_MEMORY_ATTRIBUTES + PUNCH_HOLE (vmm.memory.convert)
  memslots     KVM_X86_SW_PROTECTED_VM: delete the covering slot, re-create it split around the
               range (the range bound to the guest_memfd), + the same attribute change and punch
  memslot-ops  default VM: the slot deletes and creates alone (no private memory involved)
One conversion is one direction; each round trip converts a unit to private and back.

The data (--size, 1 GiB) is 4 memslots ("lanes"), one per converting thread. While conversions
run, 0, 1 or N vCPUs run guest/memory_toucher.S, storing to every --touch-stride of the data
and counting; the count's rate during the conversions against a quiet window just before is the
vCPUs' progress (stall = 1 - during/quiet). 8..4,096 other 4K memslots sit above 64 GiB. The
VM's binary stats give the zaps and TLB flushes each way caused.
"""

from __future__ import annotations

import mmap
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from vmm.errors import KvmError, VmmError
from vmm.guest.layout import DATA_GPA
from vmm.guest.machine import Machine
from vmm.guest.toucher import Toucher
from vmm.kvm import syscalls
from vmm.kvm.caps import PRIVATE_MEM_REASON, private_memory
from vmm.kvm.stats import Stats
from vmm.kvm.system import Kvm
from vmm.kvm.uapi import Cap, VmType
from vmm.memory.convert import ConversionPolicy, Converter, Granularity
from vmm.memory.regions import HUGE_PAGE_SIZE, PAGE_SIZE, Region
from vmm.memory.slotsplit import SplitSlot
from vmm.tools.units import human_size

from .common import host_info, interleaved, median

WAYS = ("attributes", "memslots", "memslot-ops")
LANES = 4  # data memslots: one per converting thread, so threads never split the same slot
SPARE_SLOT0 = 8  # two spare slot numbers per lane for the split pieces: 8..15
EXTRA_SLOT0 = 16  # the "other" memslots
EXTRA_GPA = 64 << 30
UNITS = {"4K": PAGE_SIZE, "2M": HUGE_PAGE_SIZE}
DEFAULT_SIZE = 1 << 30
DEFAULT_ROUNDS = 16
DEFAULT_REPEATS = 3
DEFAULT_TOUCH_STRIDE = 64 << 10
QUIET = 0.2  # seconds of vCPU progress measured without conversions, before each measurement


def progress(text: str) -> None:
    """Progress on stderr (a run takes minutes under TCG); the table goes to stdout."""
    print(f"bench memslots: {text}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Config:
    """One point of the matrix."""

    vcpus: int
    slots: int
    threads: int


def default_matrix(n: int) -> list[Config]:
    """One variable at a time: other slots 8..4,096 with N vCPUs running (the headline series),
    0/1/N vCPUs at 64 slots, 2 and 4 converting threads, and 4,096 slots with no vCPU running."""
    configs = [Config(n, s, 1) for s in (8, 64, 512, 4096)]
    configs += [Config(0, 64, 1), Config(1, 64, 1), Config(1, 64, 2), Config(1, 64, 4), Config(0, 4096, 1)]
    return sorted(set(configs), key=lambda c: (c.slots, c.vcpus, c.threads))


def full_matrix(n: int) -> list[Config]:
    """Every combination of 0/1/N vCPUs, 8..4,096 slots and 1/2/4 threads."""
    return [Config(v, s, t) for s in (8, 64, 512, 4096) for v in sorted({0, 1, n}) for t in (1, 2, 4)]


@dataclass
class Rig:
    """One way's VM: lanes, their converters (Converter or SplitSlot), the toucher, extra slots."""

    way: str
    machine: Machine
    lanes: list[Region]
    toucher: Toucher
    stats: Stats
    vcpu_stats: list[Stats] = field(default_factory=list)
    convert: list[Callable[[int, int, bool], None]] = field(default_factory=list)
    extra_map: mmap.mmap | None = None
    extras: int = 0
    slot_creation_us: dict[int, float] = field(default_factory=dict)

    def add_extras(self, count: int) -> None:
        """Bind 4K memslots above EXTRA_GPA until ``count`` exist; records µs per creation."""
        assert self.extra_map is not None
        vm, base = self.machine.vm, syscalls.address_of(self.extra_map)
        start, first = time.perf_counter(), self.extras
        for i in range(self.extras, count):
            vm.set_user_memory_region2(EXTRA_SLOT0 + i, 0, EXTRA_GPA + i * PAGE_SIZE, PAGE_SIZE, base + i * PAGE_SIZE)
        if count > first:
            self.slot_creation_us[count] = (time.perf_counter() - start) * 1e6 / (count - first)
        self.extras = max(self.extras, count)

    def close(self) -> None:
        """Stop the vCPUs, then close the stats fd, the VM and the extra slots' memory."""
        self.toucher.pause()
        self.toucher.release()
        self.stats.close()
        for s in self.vcpu_stats:
            s.close()
        self.machine.close()
        if self.extra_map is not None:
            self.extra_map.close()


def make_rig(kvm: Kvm, way: str, size: int, vcpus: int, max_slots: int, touch_stride: int) -> Rig:
    """The VM for ``way`` with its lanes, toucher (loaded, not running) and room for the extras."""
    private = way != "memslot-ops"
    m = Machine(kvm=kvm, vcpus=max(vcpus, 1), vm_type=VmType.SW_PROTECTED if private else VmType.DEFAULT)
    try:
        if private:
            lanes = m.add_private_memory(DATA_GPA, size, slots=LANES)
        else:
            lanes = [m.add_memory(DATA_GPA + i * (size // LANES), size // LANES) for i in range(LANES)]
        toucher = Toucher(m, DATA_GPA, size, touch_stride, store=True, loop=True)
        rig = Rig(way, m, lanes, toucher, m.vm.stats(), [v.stats() for v in m.vcpus])
        rig.extra_map = mmap.mmap(-1, max(max_slots, 1) * PAGE_SIZE)
        for i, lane in enumerate(lanes):
            if way == "attributes":
                rig.convert.append(_by_attributes(Converter(m.vm, m.memory)))
            else:
                spare = (SPARE_SLOT0 + 2 * i, SPARE_SLOT0 + 2 * i + 1)
                rig.convert.append(_by_memslots(SplitSlot(m.vm, lane, spare, private)))
    except BaseException:
        m.close()
        raise
    return rig


def _by_attributes(conv: Converter) -> Callable[[int, int, bool], None]:
    def convert(gpa: int, size: int, to_private: bool) -> None:
        unit = Granularity.HUGE if size % HUGE_PAGE_SIZE == 0 else Granularity.EXACT
        conv.convert(gpa, size, to_private, ConversionPolicy(granularity=unit))

    return convert


def _by_memslots(split: SplitSlot) -> Callable[[int, int, bool], None]:
    def convert(gpa: int, size: int, to_private: bool) -> None:
        if to_private:
            split.to_private(gpa - split.region.gpa, size)
        else:
            split.to_shared()

    return convert


def measure(rig: Rig, unit: int, cfg: Config, rounds: int) -> dict:
    """``rounds`` round trips per thread on its own lane while cfg.vcpus vCPUs touch memory."""
    t = rig.toucher
    mmio0, faults0 = t.mmio_exits, t.memory_faults
    if cfg.vcpus:
        t.start(cfg.vcpus)
    try:
        c0, q0 = t.total(), time.perf_counter()
        time.sleep(QUIET)
        quiet_rate = (t.total() - c0) / (time.perf_counter() - q0)
        before, faults_before = rig.stats.read(), _vcpu_faults(rig)
        times: list[list[float]] = [[] for _ in range(cfg.threads)]
        errors: list[BaseException] = []
        go = threading.Barrier(cfg.threads + 1)

        def work(lane: int) -> None:
            region, convert = rig.lanes[lane], rig.convert[lane]
            step = max(unit, (region.size // rounds) // unit * unit)
            try:
                go.wait()
                for i in range(rounds):
                    gpa = region.gpa + (i * step) % (region.size - unit + 1) // unit * unit
                    for to_private in (True, False):
                        s = time.perf_counter()
                        convert(gpa, unit, to_private)
                        times[lane].append(time.perf_counter() - s)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(cfg.threads)]
        for th in threads:
            th.start()
        c1 = t.total()
        go.wait()
        start = time.perf_counter()
        for th in threads:
            th.join()
        wall = time.perf_counter() - start
        busy_rate = (t.total() - c1) / wall
    finally:
        t.pause()
    if errors:
        raise errors[0]
    delta = rig.stats.read() - before
    faults = _vcpu_faults(rig) - faults_before
    per = [x for lane in times for x in lane]
    return {
        "unit": unit,
        "vcpus": cfg.vcpus,
        "slots": cfg.slots,
        "threads": cfg.threads,
        "conversions": len(per),
        "seconds": wall,
        "us_per_conversion": statistics.median(per) * 1e6,
        "conversions_per_s": len(per) / wall,
        "touches_per_s_quiet": quiet_rate,
        "touches_per_s_converting": busy_rate,
        "stall": max(0.0, 1 - busy_rate / quiet_rate) if cfg.vcpus and quiet_rate else None,
        "mmio_exits": t.mmio_exits - mmio0,
        "memory_faults": t.memory_faults - faults0,
        "stats_delta": delta,
        "vcpu_page_faults": faults,
    }


def _vcpu_faults(rig: Rig) -> int:
    """Page faults KVM fixed for the vCPUs so far (pf_fixed): what zapped mappings cost them."""
    return sum(s.read()["pf_fixed"] for s in rig.vcpu_stats)


def slot_limit(kvm: Kvm, size: int) -> dict:
    """Where the memslot way runs out: KVM_CAP_NR_MEMSLOTS, checked by binding the first slot number
    past it, against the slots a worst case (every other unit private) would need."""
    with kvm.create_vm() as vm:
        nr = vm.check_extension(Cap.NR_MEMSLOTS)
        with mmap.mmap(-1, PAGE_SIZE) as m:
            try:
                vm.set_user_memory_region2(nr, 0, EXTRA_GPA, PAGE_SIZE, syscalls.address_of(m))
                refused = ""
            except KvmError as e:
                refused = e.errno_name
    return {
        "nr_memslots": nr,
        "slot_past_limit_refused": refused,
        "worst_case_slots": {label: size // u for label, u in UNITS.items()},
    }


def run_memslot_bench(
    *,
    size: int = DEFAULT_SIZE,
    rounds: int = DEFAULT_ROUNDS,
    repeats: int = DEFAULT_REPEATS,
    vcpus: int | None = None,
    full: bool = False,
    ways: tuple[str, ...] = WAYS,
    touch_stride: int = DEFAULT_TOUCH_STRIDE,
    checkpoint: Callable[[dict], None] | None = None,
) -> dict:
    """Measure every configuration for every way and unit; returns the JSON-able result."""
    if size % (LANES * HUGE_PAGE_SIZE):
        raise VmmError(f"--size {human_size(size)} is not a multiple of {LANES} x 2M")
    n = vcpus or max(2, os.cpu_count() or 1)
    matrix = full_matrix(n) if full else default_matrix(n)
    with Kvm() as kvm:
        if not private_memory(kvm):
            dropped = [w for w in ways if w != "memslot-ops"]
            ways = tuple(w for w in ways if w == "memslot-ops")
            why = f"{', '.join(dropped)} need{'s' if len(dropped) == 1 else ''} {PRIVATE_MEM_REASON} (run it nested)"
            if not ways:
                raise VmmError(f"nothing to measure: {why}")
            if dropped:
                progress(f"left out: {why}")
        result: dict = {
            "host": host_info(),
            "size": size,
            "rounds": rounds,
            "repeats": repeats,
            "n_vcpus": n,
            "touch_stride": touch_stride,
            "ways": list(ways),
            "slot_limit": slot_limit(kvm, size),
            "points": [],
            "complete": False,
        }
        max_slots = max(c.slots for c in matrix)
        progress(f"setting up {len(ways)} VM(s) of {human_size(size)}, {n} vCPUs")
        rigs = {w: make_rig(kvm, w, size, n, max_slots, touch_stride) for w in ways}
        try:
            for rig in rigs.values():  # fault the data in once, so the first point is not a cold start
                rig.toucher.start(n)
            time.sleep(1.0)
            for rig in rigs.values():
                rig.toucher.pause()
            for cfg in matrix:
                for rig in rigs.values():
                    rig.add_extras(cfg.slots)
                for label, unit in UNITS.items():
                    progress(f"{label} vcpus={cfg.vcpus} slots={cfg.slots} threads={cfg.threads}")
                    runs = interleaved(repeats, list(ways), lambda w: measure(rigs[w], unit, cfg, rounds))
                    point = {"unit": label, "vcpus": cfg.vcpus, "slots": cfg.slots, "threads": cfg.threads}
                    for w in ways:
                        mine = [r for r in runs if r["impl"] == w]
                        point[w] = {
                            "us_per_conversion": median(runs, w, "us_per_conversion"),
                            "conversions_per_s": median(runs, w, "conversions_per_s"),
                            "stall": statistics.median(r["stall"] for r in mine) if cfg.vcpus else None,
                            "mmio_exits": sum(r["mmio_exits"] for r in mine),
                            "remote_tlb_flush": sum(r["stats_delta"].get("remote_tlb_flush", 0) for r in mine)
                            / sum(r["conversions"] for r in mine),
                            "vcpu_faults": sum(r["vcpu_page_faults"] for r in mine)
                            / sum(r["conversions"] for r in mine),
                            "runs": mine,
                        }
                    result["points"].append(point)
                    if checkpoint:
                        checkpoint(result)
            result["slot_creation_us"] = {w: r.slot_creation_us for w, r in rigs.items()}
        finally:
            for rig in rigs.values():
                rig.close()
    result["headline"] = headline(result)
    result["complete"] = True
    if checkpoint:
        checkpoint(result)
    return result


def headline(result: dict) -> list[dict]:
    """memslots over attributes at the most slots with the most vCPUs running, per unit."""
    out = []
    pts = [p for p in result["points"] if "memslots" in p and "attributes" in p and p["threads"] == 1]
    for label in UNITS:
        mine = [p for p in pts if p["unit"] == label]
        if mine:
            p = max(mine, key=lambda p: (p["slots"], p["vcpus"]))
            a, b = p["attributes"]["us_per_conversion"], p["memslots"]["us_per_conversion"]
            out.append({"unit": label, "slots": p["slots"], "vcpus": p["vcpus"], "ratio": b / a})
    return out
