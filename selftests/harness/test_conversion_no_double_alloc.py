"""No double allocation: a 256 MiB guest converted shared -> private -> shared, in 4K and in 2M
steps, never holds more than its size plus one conversion unit across both backings, because each
conversion discards the side no longer used. The no-discard mode shows the double it prevents.

Shared bytes come from the memfd's st_blocks; private bytes from /proc/meminfo Unevictable (the
6.12 guest_memfd cannot be mmap'd for mincore, and its pages are unevictable). That counter is
system-wide: in the nested kernel it drifts by up to ~64 KiB while the test runs, so bounds on
private bytes carry MEMINFO_SLACK."""

from __future__ import annotations

import pytest

from vmm import HUGE_PAGE_SIZE, Backing, ConversionPolicy, Kvm, Machine, VmType
from vmm.guest.layout import DATA_GPA
from vmm.memory.convert import Granularity, sweep

pytestmark = pytest.mark.private_mem

GUEST_SIZE = 256 << 20
MEMINFO_SLACK = 256 << 10


def populated(kvm: Kvm, policy: ConversionPolicy) -> Machine:
    """A SW_PROTECTED VM whose 256 MiB of data is all shared and all written (fully allocated)."""
    m = Machine(kvm=kvm, vm_type=VmType.SW_PROTECTED, policy=policy)
    region = m.add_memory(DATA_GPA, GUEST_SIZE, Backing.GUEST_MEMFD)
    m.memory.fill(DATA_GPA, GUEST_SIZE, 0x5A)
    m.converter.start_accounting()  # the Unevictable baseline, before any conversion
    assert region.shared_allocated() == GUEST_SIZE
    return m


@pytest.mark.parametrize("granularity", [Granularity.EXACT, Granularity.HUGE], ids=["4K", "2M"])
def test_conversions_never_hold_memory_twice(private_kvm: Kvm, granularity: Granularity) -> None:
    """shared->private->shared over the whole guest: shared + private <= guest size + one unit."""
    policy = ConversionPolicy(granularity=granularity, preallocate=True)
    with populated(private_kvm, policy) as m:
        conv = m.converter
        assert conv is not None
        peak_private = sweep(conv, DATA_GPA, GUEST_SIZE, policy.unit, to_private=True)[0]
        assert conv.shared_allocated() == 0
        assert conv.private_allocated() >= GUEST_SIZE - MEMINFO_SLACK  # preallocated (the kernel's fallocate)
        peak_shared = sweep(conv, DATA_GPA, GUEST_SIZE, policy.unit, to_private=False)[0]
        assert conv.private_allocated() <= MEMINFO_SLACK
    for peak in (peak_private, peak_shared):
        assert peak <= GUEST_SIZE + policy.unit + MEMINFO_SLACK, (
            f"peak {peak >> 20} MiB for a {GUEST_SIZE >> 20} MiB guest"
        )


def test_no_discard_mode_shows_the_double(private_kvm: Kvm) -> None:
    """With discard off (only to show the problem), converting everything private holds it twice."""
    policy = ConversionPolicy(granularity=Granularity.HUGE, preallocate=True, discard=False)
    with populated(private_kvm, policy) as m:
        conv = m.converter
        assert conv is not None
        peak = sweep(conv, DATA_GPA, GUEST_SIZE, policy.unit, to_private=True)[0]
        assert conv.shared_allocated() == GUEST_SIZE
    assert peak >= 2 * GUEST_SIZE - HUGE_PAGE_SIZE
