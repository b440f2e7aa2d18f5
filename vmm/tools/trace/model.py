"""The tracer's model of each traced VM's guest memory, built only from the syscalls it saw:
memslots, guest_memfd bindings, attributes, and for every range whether its shared and its private
side may hold pages. Ranges, not pages: vmm.memory.attributes' AttributeMap holds each map.

What it reports (as it happens and in the summary):
- double allocation: a conversion left the side no longer used populated (not discarded) by the
  time a vCPU re-entered the guest;
- conversions by memslot changes: a GPA range re-bound from a slot without guest_memfd to one with
  (or back) instead of a KVM_SET_MEMORY_ATTRIBUTES;
- memslot changes while another thread of the VM is inside KVM_RUN;
- memory-fault exits re-entered without the attributes they asked for, or never answered;
- private attributes set on memory without guest_memfd (no slot, or a slot without one)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from vmm.kvm import exits
from vmm.kvm.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE, ExitReason, MemFlag, enum_name
from vmm.memory.attributes import AttributeMap

from .decode import size

Warn = Callable[[str, str], None]  # (kind, message)

# values of VmModel.slot_kind: what last backed a GPA (a change of kind without a conversion is one)
_NO_SLOT, _SHARED_SLOT, _GMEM_SLOT = 0, 1, 2


@dataclass(eq=False)
class File:
    """A memfd or guest_memfd the tracee created, with where it mapped it."""

    kind: str  # "memfd" | "guest_memfd"
    name: str
    size: int = 0
    flags: int = 0
    vm: VmModel | None = None
    maps: list[tuple[int, int, int]] = field(default_factory=list)  # (hva, length, file offset)

    def hva_ranges(self, offset: int, end: int) -> Iterator[tuple[int, int]]:
        """The mapped addresses of file bytes [offset, end)."""
        for hva, length, off in self.maps:
            lo, hi = max(offset, off), min(end, off + length)
            if lo < hi:
                yield hva + lo - off, hva + hi - off


@dataclass(eq=False)
class Vcpu:
    """A vCPU fd: its kvm_run mapping and what its KVM_RUNs did."""

    vm: VmModel
    index: int
    run_addr: int | None = None
    tid_in_run: int | None = None  # the thread inside KVM_RUN now
    entered: float = 0.0  # when that KVM_RUN began
    left: float | None = None  # when the last KVM_RUN returned
    time_in_run: float = 0.0
    time_in_vmm: float = 0.0
    exits: Counter[str] = field(default_factory=Counter)
    fault: tuple[int, int, bool] | None = None  # an unanswered memory fault: (gpa, end, private)


@dataclass
class Slot:
    """One memslot as the tracee set it."""

    slot: int
    flags: int
    gpa: int
    size: int
    hva: int
    gmem: File | None
    gmem_offset: int
    in_place: bool  # the shared side is the guest_memfd's own mapping (GUEST_MEMFD_FLAG_MMAP)

    @property
    def end(self) -> int:
        """First GPA after the slot."""
        return self.gpa + self.size


@dataclass
class VmStats:
    """Counters for the summary."""

    memslot_updates: int = 0
    conversions: int = 0
    bytes_to_private: int = 0
    bytes_to_shared: int = 0
    discarded_shared: int = 0
    discarded_private: int = 0
    allocated_private: int = 0
    memory_faults: int = 0
    faults_resolved: int = 0
    warnings: Counter[str] = field(default_factory=Counter)


class VmModel:
    """Guest memory of one VM as the trace shows it."""

    def __init__(self, index: int, vm_type: int, warn: Warn) -> None:
        self.index, self.vm_type, self._warn = index, vm_type, warn
        self.slots: dict[int, Slot] = {}
        self.vcpus: list[Vcpu] = []
        self.gmems: list[File] = []
        self.attrs = AttributeMap()
        self.shared_live = AttributeMap()  # 1: the shared side may hold pages
        self.private_live = AttributeMap()  # 1: the private side may hold pages
        self.slot_kind = AttributeMap()
        self.pending: list[tuple[int, int, bool]] = []  # conversions not yet checked for discards
        self.stats = VmStats()

    def warn(self, kind: str, message: str) -> None:
        """Count and report one finding of ``kind``."""
        self.stats.warnings[kind] += 1
        self._warn(kind, f"vm{self.index}: {message}")

    # --- memslots ---------------------------------------------------------------------------

    def set_memory_region(self, s: Slot, running: list[int]) -> None:
        """KVM_SET_USER_MEMORY_REGION(2) succeeded with ``s``; ``running``: vCPUs of this VM inside
        KVM_RUN on other threads at that moment."""
        self.stats.memslot_updates += 1
        if running:
            vcpus = ", ".join(f"vcpu{i}" for i in running)
            self.warn("memslot-while-running", f"memslot {s.slot:#x} changed while {vcpus} in KVM_RUN")
        if s.size == 0:
            self.slots.pop(s.slot, None)
            return
        kind = _GMEM_SLOT if s.flags & MemFlag.GUEST_MEMFD else _SHARED_SLOT
        old = self.slots.get(s.slot)
        if not (old and old.gpa == s.gpa and old.size == s.size and (old.gmem is None) == (s.gmem is None)):
            for lo, hi, was in self.slot_kind.ranges(s.gpa, s.end):
                if was not in (_NO_SLOT, kind):
                    to = "a guest_memfd slot" if kind == _GMEM_SLOT else "a slot without guest_memfd"
                    self.warn(
                        "memslot-conversion",
                        f"[{lo:#x}, {hi:#x}) re-bound to {to} (slot {s.slot:#x}): a conversion by memslot "
                        "change, not KVM_SET_MEMORY_ATTRIBUTES",
                    )
                    break
        self.slot_kind.set(s.gpa, s.end, kind)
        self.slots[s.slot] = s
        if not s.in_place:
            self.shared_live.set(s.gpa, s.end, 1)  # unknown: count it as populated

    def overlapping(self, gpa: int, end: int) -> Iterator[tuple[Slot, int, int]]:
        """(slot, lo, hi) for each slot overlapping [gpa, end), clipped."""
        for s in self.slots.values():
            lo, hi = max(gpa, s.gpa), min(end, s.end)
            if lo < hi:
                yield s, lo, hi

    def hva_to_gpa(self, hva: int, end: int) -> Iterator[tuple[Slot, int, int]]:
        """(slot, gpa, gpa_end) of the guest memory mapped at [hva, end)."""
        for s in self.slots.values():
            lo, hi = max(hva, s.hva), min(end, s.hva + s.size)
            if lo < hi and s.hva:
                yield s, s.gpa + lo - s.hva, s.gpa + hi - s.hva

    def gmem_to_gpa(self, gmem: File, offset: int, end: int) -> Iterator[tuple[Slot, int, int]]:
        """(slot, gpa, gpa_end) bound to bytes [offset, end) of ``gmem``."""
        for s in self.slots.values():
            if s.gmem is gmem:
                lo, hi = max(offset, s.gmem_offset), min(end, s.gmem_offset + s.size)
                if lo < hi:
                    yield s, s.gpa + lo - s.gmem_offset, s.gpa + hi - s.gmem_offset

    # --- attributes and discards ------------------------------------------------------------

    def set_attributes(self, gpa: int, length: int, attributes: int) -> tuple[int, int]:
        """KVM_SET_MEMORY_ATTRIBUTES succeeded; returns (bytes now private, bytes now shared)."""
        end, private = gpa + length, bool(attributes & KVM_MEMORY_ATTRIBUTE_PRIVATE)
        changed = sum(
            hi - lo for lo, hi, v in self.attrs.ranges(gpa, end) if bool(v & KVM_MEMORY_ATTRIBUTE_PRIVATE) != private
        )
        if private:
            covered = 0
            for s, lo, hi in self.overlapping(gpa, end):
                covered += hi - lo
                if s.gmem is None:
                    self.warn(
                        "attributes-without-gmem",
                        f"[{lo:#x}, {hi:#x}) made private in slot {s.slot:#x} without guest_memfd",
                    )
            if covered < length:
                self.warn(
                    "attributes-without-gmem",
                    f"[{gpa:#x}, {end:#x}) made private: {size(length - covered)} of it has no memslot",
                )
        self.attrs.set(gpa, end, attributes)
        if changed:
            self.stats.conversions += 1
            if private:
                self.stats.bytes_to_private += changed
            else:
                self.stats.bytes_to_shared += changed
        (self.private_live if private else self.shared_live).set(gpa, end, 1)  # the guest will use that side now
        self.pending.append((gpa, end, private))
        return (changed, 0) if private else (0, changed)

    def discard(self, gpa: int, end: int, private: bool, count: bool = True) -> None:
        """One side of [gpa, end) was freed (PUNCH_HOLE, MADV_REMOVE/DONTNEED); munmap too, but
        that is teardown, not a discard the summary counts (``count`` False)."""
        live = self.private_live if private else self.shared_live
        freed = sum(hi - lo for lo, hi, v in live.ranges(gpa, end) if v)
        live.set(gpa, end, 0)
        if not count:
            return
        if private:
            self.stats.discarded_private += freed
        else:
            self.stats.discarded_shared += freed

    def allocate_private(self, gpa: int, end: int) -> None:
        """fallocate on the guest_memfd bound to [gpa, end)."""
        self.stats.allocated_private += end - gpa
        self.private_live.set(gpa, end, 1)

    def check_pending(self) -> None:
        """Each conversion since the last check must have left its other side discarded."""
        for gpa, end, private in self.pending:
            other = self.shared_live if private else self.private_live
            for s, lo, hi in self.overlapping(gpa, end):
                if s.gmem is None or s.in_place:
                    continue  # no second side (or the same pages serve both)
                if found := other.find(lo, hi, 1):
                    a, b = max(found[0], lo), min(found[1], hi)
                    side, now = ("shared", "private") if private else ("private", "shared")
                    self.warn(
                        "double-allocation",
                        f"[{a:#x}, {b:#x}) is {now} but its {side} side was not discarded (both may hold pages)",
                    )
                    break
        self.pending.clear()

    # --- vCPUs ------------------------------------------------------------------------------

    def run_entry(self, vcpu: Vcpu) -> None:
        """A vCPU enters KVM_RUN: conversions must be complete, its memory fault answered."""
        if self.pending:
            self.check_pending()
        if vcpu.fault:
            gpa, end, private = vcpu.fault
            vcpu.fault = None
            want = KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0
            if self.attrs.uniform(gpa, end) == want:
                self.stats.faults_resolved += 1
            else:
                kind = "private" if private else "shared"
                self.warn(
                    "unresolved-fault",
                    f"vcpu{vcpu.index} re-entered with its {kind} memory fault at [{gpa:#x}, {end:#x}) unanswered",
                )

    def run_exit(self, vcpu: Vcpu, e: exits.Exit) -> None:
        """KVM_RUN returned with exit ``e``."""
        vcpu.exits[enum_name(ExitReason, e.reason)] += 1
        if isinstance(e, exits.MemoryFaultExit):
            self.stats.memory_faults += 1
            vcpu.fault = (e.gpa, e.gpa + e.size, e.private)

    def finish(self) -> None:
        """End of the trace: pending checks, and faults nobody answered."""
        self.check_pending()
        for v in self.vcpus:
            if v.fault:
                gpa, end, private = v.fault
                self.warn(
                    "unresolved-fault",
                    f"vcpu{v.index}'s {'private' if private else 'shared'} memory fault at [{gpa:#x}, {end:#x}) "
                    "was never followed by another KVM_RUN",
                )
