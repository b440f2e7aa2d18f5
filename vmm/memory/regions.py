"""Guest memory: GPA regions with a shared backing (memfd) and/or a guest_memfd, bound as memslots.

A region keeps both sides so private<->shared conversions can discard whichever is unused (each
with its own fds: one guest_memfd fd per memslot, as the kernel's vm_mem_add dups it).
Host reads and writes go through the mappings in bulk (memoryview slices), never byte loops.
"""

from __future__ import annotations

import bisect
import mmap
import os
from collections.abc import Callable, Iterator
from enum import Enum
from typing import TYPE_CHECKING

from vmm.errors import ConversionError, VmmError
from vmm.kvm import syscalls, uapi
from vmm.kvm.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE, GmemFlag, MemFlag

from .attributes import AttributeMap

if TYPE_CHECKING:
    from vmm.kvm.gmem import GuestMemfd
    from vmm.kvm.vm import Vm

PAGE_SIZE = 4096
HUGE_PAGE_SIZE = 2 << 20
MFD_HUGETLB = 0x0004


class Backing(str, Enum):
    """Where a region's memory lives."""

    SHARED = "shared"  # memfd only (classic memslot)
    GUEST_MEMFD = "guest_memfd"  # memfd for shared + guest_memfd for private (private-capable slot)
    GUEST_MEMFD_ONLY = "guest_memfd-only"  # a mmap'd guest_memfd is both (6.18 GUEST_MEMFD_FLAG_MMAP)


class HugePages(str, Enum):
    """Huge pages for the shared backing."""

    NONE = "none"
    THP = "thp"  # madvise(MADV_HUGEPAGE) on the memfd mapping (shmem THP)
    HUGETLB = "hugetlb"  # memfd_create(MFD_HUGETLB): needs free 2M hugetlb pages


def check_aligned(what: str, value: int, align: int = PAGE_SIZE) -> None:
    """Refuse a size or address that is not a multiple of ``align``."""
    if value % align:
        raise VmmError(f"{what} {value:#x} is not a multiple of {align:#x}")


class Region:
    """One memslot: the kernel's struct kvm_userspace_memory_region2 as last issued (``region``, as
    in lib/kvm_util.c's struct userspace_mem_region) and the host backings it points at. slot, gpa,
    size, flags and gmem_offset read that struct, so vmm's idea of the slot and what KVM was told
    cannot drift apart; GuestMemory changes a field and issues the struct again."""

    def __init__(self, region: uapi.kvm_userspace_memory_region2, backing: Backing) -> None:
        self.region = region
        self.backing = backing
        #: memfd holding the shared pages (-1 when there is none: a guest_memfd-only slot)
        self.shared_fd = -1
        #: MAP_SHARED mapping of shared_fd, whose address is the slot's userspace_addr
        self.shared_map: mmap.mmap | None = None
        #: this region's own guest_memfd (a dup when the caller passed one): it closes with the region
        self.gmem: GuestMemfd | None = None
        #: the slot's bytes in host_map as one memoryview; GuestMemory slices it for host access
        self.host_view = memoryview(b"")

    @property
    def slot(self) -> int:
        """The memslot number (region.slot)."""
        return int(self.region.slot)

    @property
    def gpa(self) -> int:
        """First guest physical address (region.guest_phys_addr)."""
        return int(self.region.guest_phys_addr)

    @property
    def size(self) -> int:
        """Bytes of guest memory (region.memory_size; 0 once deleted)."""
        return int(self.region.memory_size)

    @property
    def flags(self) -> int:
        """KVM_MEM_* flags (region.flags), GUEST_MEMFD included when a guest_memfd is bound."""
        return int(self.region.flags)

    @property
    def gmem_offset(self) -> int:
        """Where the slot starts in its guest_memfd (region.guest_memfd_offset)."""
        return int(self.region.guest_memfd_offset)

    @property
    def end(self) -> int:
        """First GPA after the region."""
        return self.gpa + self.size

    @property
    def host_map(self) -> mmap.mmap | None:
        """The mapping KVM reads for shared accesses: the memfd's, or for a guest_memfd-only slot the
        guest_memfd's own (whose bytes for this slot start at gmem_offset)."""
        if self.backing is Backing.GUEST_MEMFD_ONLY:
            return self.gmem.map if self.gmem else None
        return self.shared_map

    @property
    def userspace_addr(self) -> int:
        """The host address bound as the slot's userspace_addr (0: none)."""
        return int(self.region.userspace_addr)

    def shared_allocated(self) -> int | None:
        """Bytes allocated in the shared backing: memfd st_blocks (tmpfs/hugetlbfs count them)."""
        if self.shared_fd >= 0:
            return os.fstat(self.shared_fd).st_blocks * 512
        return None

    def private_allocated(self) -> int | None:
        """Bytes touched in the guest_memfd range of this region (mincore; None if unmappable)."""
        if self.gmem is None or self.gmem.map is None:
            return None
        return syscalls.resident_bytes(syscalls.address_of(self.gmem.map) + self.gmem_offset, self.size)

    def guest_memfd(self) -> GuestMemfd:
        """The region's guest_memfd, or ConversionError when the slot has none."""
        if self.gmem is None:
            raise ConversionError(f"memslot {self.slot} at {self.gpa:#x} has no guest_memfd")
        return self.gmem

    def punch_hole_shared(self, offset: int, length: int) -> None:
        """Free shared pages of [offset, offset+length) of the slot (PUNCH_HOLE on the memfd)."""
        if self.shared_fd < 0:
            raise ConversionError(f"memslot {self.slot} at {self.gpa:#x} has no shared memfd")
        mode = syscalls.FALLOC_FL_KEEP_SIZE | syscalls.FALLOC_FL_PUNCH_HOLE
        syscalls.fallocate(self.shared_fd, mode, offset, length)

    def punch_hole_private(self, offset: int, length: int) -> None:
        """Free guest_memfd pages of [offset, offset+length) of the slot (PUNCH_HOLE on the guest_memfd)."""
        self.guest_memfd().punch_hole(self.gmem_offset + offset, length)

    def allocate_private(self, offset: int, length: int) -> None:
        """Allocate guest_memfd pages of [offset, offset+length) of the slot (fallocate KEEP_SIZE)."""
        self.guest_memfd().allocate(self.gmem_offset + offset, length)

    def close(self) -> None:
        """Close the fds now; a mapping someone still views is unmapped when the last view dies."""
        try:
            self.host_view.release()
        except BufferError:  # something exported the view itself; the mapping then outlives close()
            pass
        self.host_view = memoryview(b"")
        if self.shared_map is not None:
            try:
                self.shared_map.close()
            except BufferError:
                pass
            self.shared_map = None
        if self.shared_fd >= 0:
            os.close(self.shared_fd)
            self.shared_fd = -1
        if self.gmem is not None:
            self.gmem.close()  # always ours: add() dups a guest_memfd the caller passed

    def __repr__(self) -> str:
        return f"<Region slot={self.slot} [{self.gpa:#x}, {self.end:#x}) {self.backing.value}>"


class GuestMemory:
    """The VM's memslots, sorted by GPA; the single path for host access to guest memory.

    Host access refuses what vmm's attribute map says is private (``attributes``, set by the
    Converter): the host sees only the shared backing there, which is stale or discarded data, or
    (guest_memfd-only slots) a SIGBUS. shared_view()/shared_views() reach that backing on purpose."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.regions: list[Region] = []
        self._starts: list[int] = []
        self.attributes: AttributeMap | None = None  # vmm's map of private ranges (the Converter's)
        self.generation = 0  # bumped whenever a region comes or goes: lets hot paths cache a lookup
        #: GPAs of pages known poisoned (vmm.memory.poison, MemoryPoisoned): host access refuses them
        self.poisoned: set[int] = set()

    def add(
        self,
        gpa: int,
        size: int,
        backing: Backing | str = Backing.SHARED,
        *,
        slot: int | None = None,
        flags: int = 0,
        hugepages: HugePages | str = HugePages.NONE,
        gmem: GuestMemfd | None = None,
        gmem_offset: int = 0,
        gmem_flags: int | None = None,
    ) -> Region:
        """Create the backings for [gpa, gpa+size) and bind them with KVM_SET_USER_MEMORY_REGION2.

        ``gmem`` binds an existing guest_memfd (at ``gmem_offset``) instead of creating one; the
        region takes its own dup of it, so the caller still owns (and may close) ``gmem``."""
        backing, hugepages = Backing(backing), HugePages(hugepages)
        check_aligned("guest physical address", gpa)
        check_aligned("memory size", size)
        if size <= 0:
            raise VmmError("memory size must be positive")
        if any(r.gpa < gpa + size and gpa < r.end for r in self.regions):
            raise VmmError(f"[{gpa:#x}, {gpa + size:#x}) overlaps an existing region")
        slot = self._free_slot() if slot is None else slot
        struct = uapi.kvm_userspace_memory_region2(
            slot=slot, flags=flags, guest_phys_addr=gpa, memory_size=size, guest_memfd_offset=gmem_offset
        )
        region = Region(struct, backing)
        try:
            if backing is not Backing.GUEST_MEMFD_ONLY:
                region.shared_fd, region.shared_map = _shared_memfd(size, hugepages)
            view_offset = 0
            if backing is not Backing.SHARED:
                if gmem is not None:
                    region.gmem = gmem.dup()
                else:
                    if gmem_flags is None:
                        only = backing is Backing.GUEST_MEMFD_ONLY
                        gmem_flags = int(GmemFlag.MMAP | GmemFlag.INIT_SHARED) if only else 0
                    region.gmem = self.vm.create_guest_memfd(size, gmem_flags)
                struct.flags |= MemFlag.GUEST_MEMFD
                struct.guest_memfd = region.gmem.fd
                if backing is Backing.GUEST_MEMFD_ONLY:
                    region.gmem.mmap()
                    view_offset = gmem_offset  # shared and private accesses reach the same file pages
            host = region.host_map
            if host is not None:
                region.host_view = memoryview(host)[view_offset : view_offset + size]
                struct.userspace_addr = syscalls.address_of(host) + view_offset
            self._set_memslot(region)
        except BaseException:
            region.close()
            raise
        self._insert(region)
        return region

    def _set_memslot(self, region: Region) -> None:
        """Issue the region's struct with KVM_SET_USER_MEMORY_REGION2 (kernel vm_mem_add,
        vm_mem_region_move and vm_mem_region_delete all re-issue region->region)."""
        self.vm.ioctl(uapi.KVM_SET_USER_MEMORY_REGION2, region.region)

    def _insert(self, region: Region) -> None:
        """Put ``region`` in the GPA-sorted lists."""
        i = bisect.bisect(self._starts, region.gpa)
        self.regions.insert(i, region)
        self._starts.insert(i, region.gpa)
        self.generation += 1

    def _remove(self, region: Region) -> None:
        """Take ``region`` out of the GPA-sorted lists."""
        i = self.regions.index(region)
        del self.regions[i], self._starts[i]
        self.generation += 1

    def _free_slot(self) -> int:
        used = {r.slot for r in self.regions}
        return next(s for s in range(len(used) + 1) if s not in used)

    def by_slot(self, slot: int) -> Region:
        """The region bound as memslot ``slot``."""
        for r in self.regions:
            if r.slot == slot:
                return r
        raise VmmError(f"no memslot {slot}")

    def delete(self, slot: int) -> None:
        """Delete a memslot (its struct re-issued with memory_size 0) and free its backings."""
        region = self.by_slot(slot)
        size = region.size
        region.region.memory_size = 0
        try:
            self._set_memslot(region)
        except BaseException:
            region.region.memory_size = size
            raise
        self._remove(region)
        region.close()

    def move(self, slot: int, new_gpa: int) -> None:
        """Move a memslot to ``new_gpa`` keeping its contents (KVM refuses this for guest_memfd slots)."""
        region = self.by_slot(slot)
        old_gpa = region.gpa
        region.region.guest_phys_addr = new_gpa
        try:
            self._set_memslot(region)
        except BaseException:
            region.region.guest_phys_addr = old_gpa
            raise
        self._remove(region)
        self._insert(region)

    def region_at(self, gpa: int) -> Region:
        """The region holding ``gpa``."""
        i = bisect.bisect(self._starts, gpa) - 1
        if i >= 0 and gpa < self.regions[i].end:
            return self.regions[i]
        raise VmmError(f"guest physical address {gpa:#x} is not in any memslot")

    def gpa_of_hva(self, hva: int) -> int | None:
        """The GPA whose shared access reaches host address ``hva`` (through a slot's userspace_addr
        mapping), or None when no memslot maps it: e.g. a SIGBUS's si_addr."""
        for r in self.regions:
            if r.userspace_addr and r.userspace_addr <= hva < r.userspace_addr + r.size:
                return r.gpa + hva - r.userspace_addr
        return None

    def shared_view(self, gpa: int, length: int) -> memoryview:
        """A writable view of [gpa, gpa+length) in the shared backing (one region), private or not:
        for tests that check what the host sees of a private range, on purpose."""
        r = self.region_at(gpa)
        if gpa + length > r.end:
            raise VmmError(f"[{gpa:#x}, {gpa + length:#x}) crosses the end of memslot {r.slot} at {r.end:#x}")
        if self.poisoned and length > 0:
            first, last = gpa & ~(PAGE_SIZE - 1), (gpa + length - 1) & ~(PAGE_SIZE - 1)
            bad = min((p for p in self.poisoned if first <= p <= last), default=None)
            if bad is not None:
                raise VmmError(
                    f"guest memory [{gpa:#x}, {gpa + length:#x}): the page at {bad:#x} is poisoned (reading it "
                    "would SIGBUS the host); discard it first (vmm.memory.poison.discard)"
                )
        if not r.host_view.nbytes:
            raise VmmError(f"memslot {r.slot} has no host mapping")
        off = gpa - r.gpa
        return r.host_view[off : off + length]

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of [gpa, gpa+length) (one region); VmmError when any of it is private."""
        if self.attributes is not None and length > 0:
            private = self.attributes.find(gpa, gpa + length, KVM_MEMORY_ATTRIBUTE_PRIVATE)
            if private is not None:
                raise VmmError(
                    f"guest memory [{gpa:#x}, {gpa + length:#x}): [{private[0]:#x}, {private[1]:#x}) is private: "
                    "the host sees only the shared backing (GuestMemory.shared_view reaches it on purpose)"
                )
        return self.shared_view(gpa, length)

    def views(self, gpa: int, length: int) -> Iterator[tuple[int, memoryview]]:
        """(gpa, view) pieces covering [gpa, gpa+length) across adjacent memslots (view() each)."""
        return self._pieces(gpa, length, self.view)

    def shared_views(self, gpa: int, length: int) -> Iterator[tuple[int, memoryview]]:
        """(gpa, shared_view) pieces covering [gpa, gpa+length) across adjacent memslots."""
        return self._pieces(gpa, length, self.shared_view)

    def _pieces(
        self, gpa: int, length: int, view: Callable[[int, int], memoryview]
    ) -> Iterator[tuple[int, memoryview]]:
        end = gpa + length
        while gpa < end:
            r = self.region_at(gpa)
            n = min(end, r.end) - gpa
            yield gpa, view(gpa, n)
            gpa += n

    def read(self, gpa: int, length: int) -> bytes:
        """Copy guest memory out (refused where private: see view)."""
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into guest memory at ``gpa`` (refused where private: see view)."""
        self.view(gpa, len(data))[:] = data

    def fill(self, gpa: int, length: int, byte: int) -> None:
        """Set [gpa, gpa+length) to ``byte`` (across memslots, 2M at a time: no per-page Python)."""
        chunk = bytes([byte]) * HUGE_PAGE_SIZE
        for _, view in self.views(gpa, length):
            for off in range(0, len(view), HUGE_PAGE_SIZE):
                n = min(HUGE_PAGE_SIZE, len(view) - off)
                view[off : off + n] = chunk[:n]

    def read_string(self, gpa: int, limit: int = 4096) -> str:
        """A NUL-terminated string at ``gpa`` (cut at ``limit`` or the end of its region)."""
        r = self.region_at(gpa)
        raw = self.read(gpa, min(limit, r.end - gpa))
        end = raw.find(b"\0")
        return raw[: end if end >= 0 else len(raw)].decode(errors="replace")

    def close(self) -> None:
        """Close every region (the memslots go with the VM)."""
        for r in self.regions:
            r.close()
        self.regions.clear()
        self._starts.clear()
        self.generation += 1


def _shared_memfd(size: int, hugepages: HugePages) -> tuple[int, mmap.mmap]:
    """A memfd of ``size`` bytes mapped shared, with the requested huge-page policy."""
    flags = os.MFD_CLOEXEC
    if hugepages is HugePages.HUGETLB:
        check_aligned("memory size with hugetlb", size, HUGE_PAGE_SIZE)
        flags |= MFD_HUGETLB
    fd = os.memfd_create("vmm-guest", flags)
    try:
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as e:
        os.close(fd)
        if hugepages is HugePages.HUGETLB:
            raise VmmError(
                f"hugetlb memfd of {size:#x} bytes: {os.strerror(e.errno or 0)} (free 2M hugepages?)"
            ) from None
        raise
    if hugepages is HugePages.THP:
        m.madvise(mmap.MADV_HUGEPAGE)
    return fd, m
