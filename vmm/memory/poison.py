"""Memory failure on guest memory, for tests: poison the host page behind a GPA (MADV_HWPOISON,
which runs the kernel's memory_failure() on it as if the hardware had reported an uncorrectable
error; for a guest_memfd nobody can map, hwpoison-inject's corrupt-pfn on the frame found through
/proc/kpageflags), and discard a poisoned page so the slot can be populated again (PUNCH_HOLE).

Poisoning takes a physical page of the machine out of service for good, so vmm does it only inside
a nested test kernel (VMM_NESTED=1, set by `vmm nested`), never on the host that runs vmm.
What the vCPU sees next is the run loop's MemoryPoisoned (vmm.guest.runner); Machine.inject_mce
routes the error into the guest as #MC."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from enum import Enum
from typing import NamedTuple

from vmm.errors import VmmError
from vmm.kvm import syscalls
from vmm.kvm.vcpu import sigbus_caught

from .regions import PAGE_SIZE, Backing, GuestMemory, Region

MADV_HWPOISON = 100  # <asm-generic/mman-common.h>; needs CAP_SYS_ADMIN and CONFIG_MEMORY_FAILURE
NESTED_ENV = "VMM_NESTED"
HWPOISON_DEBUGFS = "/sys/kernel/debug/hwpoison/"  # mm/hwpoison-inject.c
KPF_UNEVICTABLE = 18  # include/uapi/linux/kernel-page-flags.h
NOT_NESTED = (
    "poisoning retires a physical page of this machine for good (MADV_HWPOISON): vmm poisons only "
    "inside a nested test kernel (VMM_NESTED=1, as `vmm nested` sets it)"
)


class Side(str, Enum):
    """Which backing of a GPA: the memslot's shared mapping, or its guest_memfd."""

    SHARED = "shared"
    PRIVATE = "private"


def refuse_unless_nested() -> None:
    """VmmError unless this process runs inside `vmm nested` (VMM_NESTED=1)."""
    if os.environ.get(NESTED_ENV) != "1":
        raise VmmError(NOT_NESTED)


def host_address(memory: GuestMemory, gpa: int, side: Side | str) -> int:
    """The host address of the page holding ``gpa`` on ``side``: the slot's userspace mapping
    (shared), or the guest_memfd's own mapping (private: needs an mmap-able guest_memfd)."""
    region = memory.region_at(gpa)
    page = gpa & ~(PAGE_SIZE - 1)
    if Side(side) is Side.SHARED:
        if not region.userspace_addr:
            raise VmmError(f"memslot {region.slot} at {region.gpa:#x} has no shared mapping to poison")
        return region.userspace_addr + page - region.gpa
    gmem = region.gmem
    if gmem is None:
        raise VmmError(f"memslot {region.slot} at {region.gpa:#x} has no guest_memfd")
    if gmem.map is None:
        raise VmmError(f"the guest_memfd of memslot {region.slot} is not mapped (no GUEST_MEMFD_FLAG_MMAP)")
    return syscalls.address_of(gmem.map) + region.gmem_offset + page - region.gpa


class Poisoned(NamedTuple):
    """What poisoning a page did: its host address, madvise's errno (0, or EBUSY: memory_failure()
    marked the page but could not isolate it) and the si_code of the SIGBUS memory_failure() sent
    the caller (None when none came: a page not mapped dirty, or a kill policy that waits)."""

    hva: int  # 0: the page was poisoned by its pfn (a guest_memfd nobody can map)
    errno: int
    sigbus: int | None
    pfn: int | None = None  # the frame, when poisoned through hwpoison-inject


def poison(memory: GuestMemory, gpa: int, side: Side | str = Side.SHARED) -> Poisoned:
    """MADV_HWPOISON the host page backing ``gpa`` on ``side`` (inside a nested test kernel only).
    The page is recorded in ``memory.poisoned``, so vmm's own host accesses refuse it; a SIGBUS the
    kernel sends this thread for it is caught and reported. madvise() poisons through
    get_user_pages(): an unpopulated page is allocated to be poisoned."""
    refuse_unless_nested()
    region = memory.region_at(gpa)
    if Side(side) is Side.PRIVATE and region.gmem is not None and region.gmem.map is None:
        return _poison_unmapped_gmem(memory, region, gpa)
    addr = host_address(memory, gpa, side)
    memory.poisoned.add(gpa & ~(PAGE_SIZE - 1))
    err = 0
    with sigbus_caught() as signals:
        try:
            syscalls.madvise(addr, PAGE_SIZE, MADV_HWPOISON)
        except OSError as e:
            # EBUSY: memory_failure() marked the page poisoned but could not isolate it (7.3, a
            # guest_memfd page still mapped: "dirty unevictable LRU page still referenced by 1 users")
            if e.errno != errno.EBUSY:
                memory.poisoned.discard(gpa & ~(PAGE_SIZE - 1))
                raise VmmError(f"MADV_HWPOISON of the {Side(side).value} page at gpa {gpa:#x}: {e.strerror}") from None
            err = e.errno
    return Poisoned(addr, err, signals[0][0] if signals else None)


def _poison_unmapped_gmem(memory: GuestMemory, region: Region, gpa: int) -> Poisoned:
    """Poison a page of a guest_memfd nobody can map (a VM with private memory): no pagemap gives
    its pfn, so the page is punched, allocated again, and found as the one frame that turned
    unevictable meanwhile (/proc/kpageflags: guest_memfd's mapping is unevictable); then
    hwpoison-inject's corrupt-pfn poisons it. The page's old contents are lost (it reads zeros)."""
    offset = (gpa & ~(PAGE_SIZE - 1)) - region.gpa
    region.punch_hole_private(offset, PAGE_SIZE)
    pfn = new_unevictable_pfn(lambda: region.allocate_private(offset, PAGE_SIZE))
    memory.poisoned.add(gpa & ~(PAGE_SIZE - 1))
    return Poisoned(0, write_hwpoison(pfn), None, pfn)


def _kpageflags() -> bytes:
    """/proc/kpageflags: one u64 of KPF_* flags per page frame (needs root)."""
    chunks: list[bytes] = []
    offset = 0
    fd = os.open("/proc/kpageflags", os.O_RDONLY)
    try:
        while chunk := os.pread(fd, 1 << 20, offset):
            chunks.append(chunk)
            offset += len(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def new_unevictable_pfn(allocate: Callable[[], None]) -> int:
    """The page frame ``allocate()`` brings in, as the one frame whose KPF_UNEVICTABLE turns on
    meanwhile; VmmError unless exactly one does. LRU batches are drained first and after
    (compact_memory runs lru_add_drain_all()), so the flag of a new folio is set when looked at.
    Frames are compared 4 KiB of flags at a time (bytes compare in C), only differing runs per frame."""

    def drain() -> None:
        with open("/proc/sys/vm/compact_memory", "w") as f:
            f.write("1\n")

    drain()
    before = _kpageflags()
    allocate()
    drain()
    after = _kpageflags()
    run, found = 4096, []
    for start in range(0, min(len(before), len(after)), run):
        if before[start : start + run] != after[start : start + run]:
            for at in range(start, min(start + run, len(after)), 8):
                old, new = (int.from_bytes(b[at : at + 8], "little") >> KPF_UNEVICTABLE & 1 for b in (before, after))
                if new and not old:
                    found.append(at // 8)
    if len(found) != 1:
        raise VmmError(
            f"expected one page frame to turn unevictable, found {len(found)}: cannot tell the guest_memfd page"
        )
    return found[0]


def pfn_of(hva: int) -> int:
    """The page frame behind host address ``hva`` of this process (/proc/self/pagemap: present bit
    63, pfn in bits 54:0; the pfn reads as 0 without CAP_SYS_ADMIN)."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(hva // syscalls.HOST_PAGE_SIZE * 8)
        entry = int.from_bytes(f.read(8), "little")
    pfn = entry & ((1 << 55) - 1)
    if not entry >> 63 or not pfn:
        raise VmmError(f"no page frame behind host address {hva:#x} (not present, or no CAP_SYS_ADMIN)")
    return pfn


def write_hwpoison(pfn: int, mark: bool = True) -> int:
    """Write ``pfn`` to debugfs hwpoison-inject's corrupt-pfn (memory_failure(pfn, 0), as a memory
    scrubber would report it) or unpoison-pfn; inside a nested test kernel only. Returns 0, or the
    errno memory_failure() / unpoison_memory() answered with."""
    refuse_unless_nested()
    path = HWPOISON_DEBUGFS + ("corrupt-pfn" if mark else "unpoison-pfn")
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as e:
        raise VmmError(f"{path}: {e.strerror} (needs CONFIG_HWPOISON_INJECT, debugfs and root)") from None
    try:  # one write(2): a buffered file would write again on close after a failure
        os.write(fd, f"{pfn:#x}\n".encode())
    except OSError as e:
        return e.errno or 0
    finally:
        os.close(fd)
    return 0


def discard(memory: GuestMemory, gpa: int, side: Side | str = Side.SHARED) -> Region:
    """Discard the (poisoned) page holding ``gpa`` on ``side`` with PUNCH_HOLE, as a VMM recovers:
    the next access allocates a fresh page (zeros). Returns the region."""
    region = memory.region_at(gpa)
    memory.poisoned.discard(gpa & ~(PAGE_SIZE - 1))
    offset = (gpa & ~(PAGE_SIZE - 1)) - region.gpa
    if Side(side) is Side.PRIVATE or region.backing is Backing.GUEST_MEMFD_ONLY:
        region.punch_hole_private(offset, PAGE_SIZE)
    else:
        region.punch_hole_shared(offset, PAGE_SIZE)
    if Side(side) is Side.SHARED:
        # memory_failure() left a hwpoison entry in vmm's own page table, which PUNCH_HOLE's unmap
        # keeps (zap_nonpresent_ptes() skips them unless even_cows): KVM's get_user_pages() on the
        # slot's address would still fail. MADV_DONTNEED zaps it, so the next access faults anew.
        syscalls.madvise(host_address(memory, gpa, side), PAGE_SIZE, syscalls.MADV_DONTNEED)
    return region
