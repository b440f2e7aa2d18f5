"""Memory failure on guest memory, for tests: poison the host page behind a GPA (MADV_HWPOISON,
which runs the kernel's memory_failure() on it as if the hardware had reported an uncorrectable
error), and discard a poisoned page so the slot can be populated again (PUNCH_HOLE).

Poisoning takes a physical page of the machine out of service for good, so vmm does it only inside
a nested test kernel (VMM_NESTED=1, set by `vmm nested`), never on the host that runs vmm.
What the vCPU sees next is the run loop's MemoryPoisoned (vmm.guest.runner); Machine.inject_mce
routes the error into the guest as #MC."""

from __future__ import annotations

import errno
import os
from enum import Enum
from typing import NamedTuple

from vmm.errors import VmmError
from vmm.kvm import syscalls
from vmm.kvm.vcpu import sigbus_caught

from .regions import PAGE_SIZE, Backing, GuestMemory, Region

MADV_HWPOISON = 100  # <asm-generic/mman-common.h>; needs CAP_SYS_ADMIN and CONFIG_MEMORY_FAILURE
NESTED_ENV = "VMM_NESTED"
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
        raise VmmError(
            f"poisoning the guest_memfd page at {page:#x} needs its pfn, which only a mapping of the "
            "guest_memfd gives (GUEST_MEMFD_FLAG_MMAP with INIT_SHARED; a VM with private memory "
            "cannot map its guest_memfd)"
        )
    return syscalls.address_of(gmem.map) + region.gmem_offset + page - region.gpa


class Poisoned(NamedTuple):
    """What poisoning a page did: its host address, madvise's errno (0, or EBUSY: memory_failure()
    marked the page but could not isolate it) and the si_code of the SIGBUS memory_failure() sent
    the caller (None when none came: a page not mapped dirty, or a kill policy that waits)."""

    hva: int
    errno: int
    sigbus: int | None


def poison(memory: GuestMemory, gpa: int, side: Side | str = Side.SHARED) -> Poisoned:
    """MADV_HWPOISON the host page backing ``gpa`` on ``side`` (inside a nested test kernel only).
    The page is recorded in ``memory.poisoned``, so vmm's own host accesses refuse it; a SIGBUS the
    kernel sends this thread for it is caught and reported. madvise() poisons through
    get_user_pages(): an unpopulated page is allocated to be poisoned."""
    refuse_unless_nested()
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
