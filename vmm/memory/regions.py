"""Guest memory: GPA regions with a shared backing (memfd) and/or a guest_memfd, bound as memslots.

A region keeps both sides so private<->shared conversions can discard whichever is unused.
Host reads and writes go through the mappings in bulk (memoryview slices), never byte loops.
"""

from __future__ import annotations

import bisect
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from vmm.errors import VmmError
from vmm.kvm import syscalls
from vmm.kvm.uapi import GmemFlag, MemFlag

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


@dataclass(eq=False)
class Region:
    """One memslot: [gpa, gpa+size) and its backings."""

    slot: int
    gpa: int
    size: int
    backing: Backing
    flags: int = 0
    memfd: int = -1
    shared: mmap.mmap | None = None
    gmem: GuestMemfd | None = None
    gmem_offset: int = 0
    owns_gmem: bool = True
    view: memoryview = field(default_factory=lambda: memoryview(b""), repr=False)

    @property
    def end(self) -> int:
        """First GPA after the region."""
        return self.gpa + self.size

    @property
    def host_map(self) -> mmap.mmap | None:
        """The mapping KVM reads for shared accesses (the memfd's, or the guest_memfd's own)."""
        if self.backing is Backing.GUEST_MEMFD_ONLY:
            return self.gmem.map if self.gmem else None
        return self.shared

    @property
    def userspace_addr(self) -> int:
        """The host address bound as the slot's userspace_addr (0: none)."""
        host = self.host_map
        return syscalls.address_of(host) if host is not None else 0

    def shared_allocated(self) -> int | None:
        """Bytes allocated in the shared backing: memfd st_blocks (tmpfs/hugetlbfs count them)."""
        if self.memfd >= 0:
            return os.fstat(self.memfd).st_blocks * 512
        return None

    def private_allocated(self) -> int | None:
        """Bytes touched in the guest_memfd range of this region (mincore; None if unmappable)."""
        if self.gmem is None or self.gmem.map is None:
            return None
        return syscalls.resident_bytes(syscalls.address_of(self.gmem.map) + self.gmem_offset, self.size)

    def discard_shared(self, offset: int, length: int) -> None:
        """Free shared pages of [offset, offset+length) (PUNCH_HOLE on the memfd)."""
        syscalls.fallocate(self.memfd, syscalls.FALLOC_FL_KEEP_SIZE | syscalls.FALLOC_FL_PUNCH_HOLE, offset, length)

    def discard_private(self, offset: int, length: int) -> None:
        """Free guest_memfd pages of [offset, offset+length) (PUNCH_HOLE on the guest_memfd)."""
        assert self.gmem is not None
        self.gmem.punch_hole(self.gmem_offset + offset, length)

    def close(self) -> None:
        """Close the fds now; a mapping someone still views is unmapped when the last view dies."""
        try:
            self.view.release()
            if self.shared is not None:
                self.shared.close()
        except BufferError:
            pass
        self.shared = None
        if self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1
        if self.gmem is not None and self.owns_gmem:
            self.gmem.close()


class GuestMemory:
    """The VM's memslots, sorted by GPA; the single path for host access to guest memory."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.regions: list[Region] = []
        self._starts: list[int] = []

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

        ``gmem`` binds an existing guest_memfd (at ``gmem_offset``) instead of creating one."""
        backing, hugepages = Backing(backing), HugePages(hugepages)
        check_aligned("guest physical address", gpa)
        check_aligned("memory size", size)
        if size <= 0:
            raise VmmError("memory size must be positive")
        if any(r.gpa < gpa + size and gpa < r.end for r in self.regions):
            raise VmmError(f"[{gpa:#x}, {gpa + size:#x}) overlaps an existing region")
        slot = self._free_slot() if slot is None else slot
        region = Region(slot, gpa, size, backing, flags, gmem_offset=gmem_offset, owns_gmem=gmem is None)
        try:
            if backing is not Backing.GUEST_MEMFD_ONLY:
                region.memfd, region.shared = _shared_memfd(size, hugepages)
            if backing is not Backing.SHARED:
                if gmem is None:
                    if gmem_flags is None:
                        gmem_flags = (
                            int(GmemFlag.MMAP | GmemFlag.INIT_SHARED) if backing is Backing.GUEST_MEMFD_ONLY else 0
                        )
                    gmem = self.vm.create_guest_memfd(size, gmem_flags)
                region.gmem = gmem
                region.flags |= MemFlag.GUEST_MEMFD
                if backing is Backing.GUEST_MEMFD_ONLY:
                    gmem.mmap()
            if region.host_map is not None:
                region.view = memoryview(region.host_map)
            self.vm.set_user_memory_region2(
                slot,
                region.flags,
                gpa,
                size,
                region.userspace_addr,
                region.gmem.fd if region.gmem else 0,
                gmem_offset,
            )
        except BaseException:
            region.close()
            raise
        i = bisect.bisect(self._starts, gpa)
        self.regions.insert(i, region)
        self._starts.insert(i, gpa)
        return region

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
        """Delete a memslot (size 0) and free its backings."""
        region = self.by_slot(slot)
        self.vm.set_user_memory_region2(slot, region.flags, region.gpa, 0, 0)
        i = self.regions.index(region)
        del self.regions[i], self._starts[i]
        region.close()

    def move(self, slot: int, new_gpa: int) -> None:
        """Move a memslot to ``new_gpa`` keeping its contents (KVM refuses this for guest_memfd slots)."""
        region = self.by_slot(slot)
        self.vm.set_user_memory_region2(
            slot,
            region.flags,
            new_gpa,
            region.size,
            region.userspace_addr,
            region.gmem.fd if region.gmem else 0,
            region.gmem_offset,
        )
        i = self.regions.index(region)
        del self.regions[i], self._starts[i]
        region.gpa = new_gpa
        j = bisect.bisect(self._starts, new_gpa)
        self.regions.insert(j, region)
        self._starts.insert(j, new_gpa)

    def region_at(self, gpa: int) -> Region:
        """The region holding ``gpa``."""
        i = bisect.bisect(self._starts, gpa) - 1
        if i >= 0 and gpa < self.regions[i].end:
            return self.regions[i]
        raise VmmError(f"guest physical address {gpa:#x} is not in any memslot")

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of [gpa, gpa+length) in the host mapping (must lie in one region)."""
        r = self.region_at(gpa)
        if gpa + length > r.end:
            raise VmmError(f"[{gpa:#x}, {gpa + length:#x}) crosses the end of memslot {r.slot} at {r.end:#x}")
        if not r.view.nbytes:
            raise VmmError(f"memslot {r.slot} has no host mapping")
        off = gpa - r.gpa
        return r.view[off : off + length]

    def views(self, gpa: int, length: int) -> Iterator[tuple[int, memoryview]]:
        """(gpa, view) pieces covering [gpa, gpa+length) across adjacent memslots."""
        end = gpa + length
        while gpa < end:
            r = self.region_at(gpa)
            n = min(end, r.end) - gpa
            yield gpa, self.view(gpa, n)
            gpa += n

    def read(self, gpa: int, length: int) -> bytes:
        """Copy guest memory out."""
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into guest memory at ``gpa``."""
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
