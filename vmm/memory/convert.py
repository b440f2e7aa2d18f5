"""Private<->shared conversions as a production VMM does them: set the attributes, then discard the
side no longer used (PUNCH_HOLE), so a page is never held twice. A policy picks the granularity:
exact 4K pages, or 2M-aligned ranges that keep huge pages whole.

What "whole" buys, measured from the VM's pages_2m stat (selftests/harness/test_huge_pages.py, on
6.12 and 7.3): KVM maps a 2M range with one 2M page only when its attributes are uniform and the
backing is 2M. Shared memory on a THP memfd is (after a 2M round trip the punched chunk comes back
as a new huge folio), but one 4K conversion inside a chunk splits the memfd's folio with its
PUNCH_HOLE and the chunk stays 4K for good. Private memory is always 4K today: guest_memfd
allocates order-0 folios, so a 2M-aligned private range is 512 4K mappings either way."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from vmm.errors import ConversionError, VmmError
from vmm.kvm import syscalls
from vmm.kvm.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE

from .attributes import AttributeMap
from .regions import HUGE_PAGE_SIZE, PAGE_SIZE, GuestMemory, Region

if TYPE_CHECKING:
    from vmm.kvm.vm import Vm


class Granularity(str, Enum):
    """Conversion unit."""

    EXACT = "4k"  # any page-aligned range
    HUGE = "2m"  # 2M-aligned ranges only (refused, or widened when the caller asks): keeps THP whole


@dataclass
class ConversionPolicy:
    """How conversions are done: granularity, widening, and discard (off only to show the double)."""

    granularity: Granularity = Granularity.EXACT
    widen: bool = False
    discard: bool = True
    preallocate: bool = False  # fallocate the guest_memfd range when it turns private

    @property
    def unit(self) -> int:
        """Bytes of one conversion unit (4K or 2M)."""
        return HUGE_PAGE_SIZE if self.granularity is Granularity.HUGE else PAGE_SIZE


@dataclass
class ConversionStats:
    """Counters for reports and benchmarks."""

    conversions: int = 0
    bytes_to_private: int = 0
    bytes_to_shared: int = 0


class Converter:
    """Owns the attribute map of one VM and performs conversions on its guest memory."""

    def __init__(self, vm: Vm, memory: GuestMemory, policy: ConversionPolicy | None = None) -> None:
        self.vm = vm
        self.memory = memory
        self.policy = policy or ConversionPolicy()
        self.attributes = AttributeMap()
        memory.attributes = self.attributes  # host reads and writes of private ranges are refused
        self.stats = ConversionStats()
        self.supported = vm.supported_memory_attributes()
        self._unevictable_base: int | None = None  # taken by start_accounting(), not for every VM

    # --- validation -------------------------------------------------------------------------

    def align(self, gpa: int, size: int, policy: ConversionPolicy | None = None) -> tuple[int, int]:
        """Apply the policy's granularity: the range to convert, or ConversionError."""
        policy = policy or self.policy
        if size <= 0 or gpa % PAGE_SIZE or size % PAGE_SIZE:
            raise ConversionError(f"conversion [{gpa:#x}, +{size:#x}) is not 4K-aligned and non-empty")
        unit = policy.unit
        if gpa % unit or size % unit:
            if not policy.widen:
                raise ConversionError(
                    f"conversion [{gpa:#x}, +{size:#x}) is not {unit >> 20}M-aligned (2M policy; "
                    "ask for widening to convert the enclosing huge pages)"
                )
            start, end = gpa - gpa % unit, -(-(gpa + size) // unit) * unit
            gpa, size = start, end - start
        return gpa, size

    def pieces(self, gpa: int, size: int, need_gmem: bool) -> Iterator[tuple[Region, int, int]]:
        """(region, offset in it, length) covering [gpa, gpa+size) exactly, or ConversionError on a
        gap (or, with ``need_gmem``, on a memslot without guest_memfd)."""
        addr, end = gpa, gpa + size
        while addr < end:
            try:
                r = self.memory.region_at(addr)
            except VmmError:
                raise ConversionError(f"[{gpa:#x}, {end:#x}) is not all guest memory: nothing at {addr:#x}") from None
            if need_gmem and r.gmem is None:
                raise ConversionError(f"[{gpa:#x}, {end:#x}): memslot {r.slot} at {r.gpa:#x} has no guest_memfd")
            length = min(end, r.end) - addr
            yield r, addr - r.gpa, length
            addr += length

    # --- the conversion --------------------------------------------------------------------

    def convert(self, gpa: int, size: int, to_private: bool, policy: ConversionPolicy | None = None) -> tuple[int, int]:
        """Make [gpa, gpa+size) private or shared, then discard the unused side. Returns the range
        actually converted (wider than asked under a widening 2M policy). ``policy`` overrides the
        converter's for this call."""
        policy = policy or self.policy
        if not self.supported & KVM_MEMORY_ATTRIBUTE_PRIVATE:
            raise ConversionError(
                "this VM does not support KVM_MEMORY_ATTRIBUTE_PRIVATE (needs KVM_X86_SW_PROTECTED_VM)"
            )
        gpa, size = self.align(gpa, size, policy)
        pieces = list(self.pieces(gpa, size, need_gmem=True))
        attrs = KVM_MEMORY_ATTRIBUTE_PRIVATE if to_private else 0
        self.vm.set_memory_attributes(gpa, size, attrs)
        self.attributes.set(gpa, gpa + size, attrs)
        for region, offset, length in pieces:
            if to_private and policy.preallocate:
                region.allocate_private(offset, length)
            if policy.discard:
                if to_private:
                    if region.shared_fd >= 0:
                        region.punch_hole_shared(offset, length)
                else:
                    region.punch_hole_private(offset, length)
        s = self.stats
        s.conversions += 1
        if to_private:
            s.bytes_to_private += size
        else:
            s.bytes_to_shared += size
        return gpa, size

    def punch_hole(self, gpa: int, size: int) -> None:
        """Discard private pages of [gpa, gpa+size) without changing attributes (they read back as 0;
        the kernel selftests' vm_guest_mem_punch_hole)."""
        for region, offset, length in self.pieces(gpa, size, need_gmem=True):
            region.punch_hole_private(offset, length)

    def is_private(self, gpa: int, size: int = PAGE_SIZE) -> bool | None:
        """True/False when [gpa, gpa+size) is all private/shared in our map, None when mixed."""
        value = self.attributes.uniform(gpa, gpa + size)
        return None if value is None else bool(value & KVM_MEMORY_ATTRIBUTE_PRIVATE)

    # --- accounting ------------------------------------------------------------------------

    def shared_allocated(self) -> int:
        """Bytes held by the shared (memfd) backings, from st_blocks."""
        return sum(r.shared_allocated() or 0 for r in self.memory.regions)

    def start_accounting(self) -> None:
        """Take the /proc/meminfo Unevictable baseline private_allocated() measures from (now)."""
        self._unevictable_base = syscalls.meminfo("Unevictable")

    def private_allocated(self) -> int:
        """Bytes held by the guest_memfds: mincore over each memslot's range when they are all
        mmap'd (slots of one guest_memfd bind disjoint ranges, so nothing counts twice), else the
        growth of /proc/meminfo Unevictable since start_accounting() (guest_memfd pages are
        unevictable; system-wide, so meant for a quiet test machine such as the nested kernel).
        Without start_accounting() the first call takes the baseline and returns 0."""
        with_gmem = [r for r in self.memory.regions if r.gmem is not None]
        if with_gmem and all(r.gmem is not None and r.gmem.map is not None for r in with_gmem):
            return sum(r.private_allocated() or 0 for r in with_gmem)
        now = syscalls.meminfo("Unevictable")
        if self._unevictable_base is None:
            self._unevictable_base = now
        return max(0, now - self._unevictable_base)

    def map_state(self, gpa: int, around: int = 4 * PAGE_SIZE) -> str:
        """The attribute ranges near ``gpa``, for error messages."""
        start = max(0, gpa - around)
        parts = [
            f"[{s:#x}, {e:#x}) {'private' if v & KVM_MEMORY_ATTRIBUTE_PRIVATE else 'shared'}"
            for s, e, v in self.attributes.ranges(start, gpa + around)
        ]
        return "; ".join(parts)


def sweep(conv: Converter, gpa: int, size: int, unit: int, to_private: bool, samples: int = 256) -> tuple[int, float]:
    """Convert [gpa, gpa+size) in ``unit`` steps from the host. Returns the peak shared + private
    bytes seen (read ``samples`` times along the way: a /proc/meminfo read after each of 65,536
    steps is slow) and the seconds spent in the conversions alone (the reads are not timed)."""
    peak, spent = 0, 0.0
    steps = size // unit
    every = max(1, steps // samples)
    for i in range(steps):
        start = time.perf_counter()
        conv.convert(gpa + i * unit, unit, to_private)
        spent += time.perf_counter() - start
        if i % every == every - 1 or i == steps - 1:
            peak = max(peak, conv.shared_allocated() + conv.private_allocated())
    return peak, spent
