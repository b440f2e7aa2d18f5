"""vmm's conversions (memory attributes + PUNCH_HOLE) against the memslot way guest_memfd rejected
(vmm.memory.slotsplit: delete the covering slot, re-create it split around the range): both give
the guest the same data, and the memslot way's extra zaps show in the VM's binary stats. The
figures are `vmm bench memslots`'s; these tests check behaviour only."""

from __future__ import annotations

import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from vmm import Kvm, Machine, VmType
from vmm.errors import ConversionError
from vmm.guest.layout import DATA_GPA
from vmm.guest.toucher import Toucher
from vmm.kvm.stats import Stats
from vmm.kvm.uapi import KVM_X86_QUIRK_SLOT_ZAP_ALL, Cap
from vmm.memory.convert import ConversionPolicy, Granularity
from vmm.memory.regions import HUGE_PAGE_SIZE, PAGE_SIZE, Region
from vmm.memory.slotsplit import SplitSlot
from vmm.tools.pytest_plugin import require

from helpers import expect_sync

SIZE = 4 << 20
PAGES = SIZE // PAGE_SIZE
SPARE = (8, 9)
Convert = Callable[[int, int, bool], None]


@contextmanager
def rig(kvm: Kvm, way: str) -> Iterator[tuple[Machine, Region, Toucher, Stats, Convert]]:
    """A SW_PROTECTED machine with a 4 MiB private-capable region whose page i starts with the u64
    i + 1, the toucher loaded over it (one load per page, SYNC with their sum) and ``way``'s
    conversion function."""
    with Machine(kvm=kvm, vm_type=VmType.SW_PROTECTED) as m, m.vm.stats() as stats:
        (region,) = m.add_private_memory(DATA_GPA, SIZE)
        words = region.host_view.cast("Q")
        words[:: PAGE_SIZE // 8] = memoryview(array.array("Q", range(1, PAGES + 1)))
        words.release()
        toucher = Toucher(m, DATA_GPA, SIZE, PAGE_SIZE)
        if way == "attributes":
            conv = m.converter
            assert conv is not None

            def convert(gpa: int, size: int, to_private: bool) -> None:
                unit = Granularity.HUGE if size % HUGE_PAGE_SIZE == 0 else Granularity.EXACT
                conv.convert(gpa, size, to_private, ConversionPolicy(granularity=unit))

        else:
            split = SplitSlot(m.vm, region, SPARE, private=True)

            def convert(gpa: int, size: int, to_private: bool) -> None:
                if to_private:
                    split.to_private(gpa - region.gpa, size)
                else:
                    split.to_shared()

        try:
            yield m, region, toucher, stats, convert
        finally:
            toucher.release()


def guest_sum(m: Machine) -> int:
    """One pass of the toucher: the sum of the first u64 of every page, as the guest read them."""
    return expect_sync(m.run(timeout=60), 1).args[1]


def pages_sum(first: int, count: int) -> int:
    """What pages first..first+count-1 contribute while they hold their numbers."""
    return sum(range(first + 1, first + count + 1))


@pytest.mark.private_mem
@pytest.mark.parametrize("unit", [PAGE_SIZE, HUGE_PAGE_SIZE], ids=["4K", "2M"])
def test_both_ways_give_the_guest_the_same_data(private_kvm: Kvm, unit: int) -> None:
    """Shared data, then a unit made private (a fresh guest_memfd page reads 0), then shared again
    (its shared pages were punched on the way: 0 again): the guest reads the same sums both ways,
    and the sums the host expects."""
    first = HUGE_PAGE_SIZE // PAGE_SIZE if unit == HUGE_PAGE_SIZE else 5
    gpa, n = DATA_GPA + first * PAGE_SIZE, unit // PAGE_SIZE
    whole = pages_sum(0, PAGES)
    expected = [whole, whole - pages_sum(first, n), whole - pages_sum(first, n)]
    seen = {}
    for way in ("attributes", "memslots"):
        with rig(private_kvm, way) as (m, _, _, _, convert):
            sums = [guest_sum(m)]
            convert(gpa, unit, True)
            sums.append(guest_sum(m))
            convert(gpa, unit, False)
            sums.append(guest_sum(m))
            seen[way] = sums
    assert seen["attributes"] == seen["memslots"] == expected, seen


@pytest.mark.private_mem
def test_memslot_way_zaps_the_whole_slot(private_kvm: Kvm) -> None:
    """After the guest mapped all 1,024 pages, converting one 4K page by attributes zaps exactly
    that page's mapping (pages_4k - 1); deleting and splitting the slot zaps all 1,024 of them,
    and the vCPU must fault every one back in."""
    dropped = {}
    for way in ("attributes", "memslots"):
        with rig(private_kvm, way) as (m, _, _, stats, convert):
            guest_sum(m)
            before = stats.read()
            convert(DATA_GPA + 5 * PAGE_SIZE, PAGE_SIZE, True)
            after = stats.read()
            dropped[way] = before["pages_4k"] - after["pages_4k"]
    assert dropped == {"attributes": 1, "memslots": PAGES}, dropped


@pytest.mark.parametrize("zap_all", [True, False], ids=["quirk", "quirk_disabled"])
def test_default_vm_slot_deletion_zaps_everything(kvm: Kvm, zap_all: bool) -> None:
    """On a default VM, deleting any memslot, even one the guest never touched, zaps every mapping
    of the VM (KVM_X86_QUIRK_SLOT_ZAP_ALL, on by default: kvm_arch_flush_shadow_memslot's fast
    zap), so every vCPU faults its whole working set back in after each memslot-way conversion;
    with the quirk disabled only the deleted slot's mappings go (a SW_PROTECTED VM never zaps all)."""
    require(kvm.check_extension(Cap.DISABLE_QUIRKS2) & KVM_X86_QUIRK_SLOT_ZAP_ALL, "KVM_X86_QUIRK_SLOT_ZAP_ALL")
    with Machine(kvm=kvm) as m, m.vm.stats() as stats:
        if not zap_all:
            m.vm.enable_cap(Cap.DISABLE_QUIRKS2, KVM_X86_QUIRK_SLOT_ZAP_ALL)
        m.add_memory(DATA_GPA, SIZE)
        other = m.add_memory(DATA_GPA + 2 * SIZE, PAGE_SIZE)  # never mapped by the guest
        toucher = Toucher(m, DATA_GPA, SIZE, PAGE_SIZE)
        try:
            guest_sum(m)
            mapped = stats.read()["pages_4k"]
            require(mapped >= PAGES, "a KVM MMU that counts its mappings in pages_4k (the TDP MMU)")
            m.memory.delete(other.slot)
            left = stats.read()["pages_4k"]
        finally:
            toucher.release()
    assert left == (0 if zap_all else mapped), (mapped, left)


@pytest.mark.host_only
def test_split_slot_refuses_bad_ranges(kvm: Kvm) -> None:
    """SplitSlot's bookkeeping on a default VM (memslot operations only): one split at a time, inside
    the slot, and nothing to merge before a split; the slot is whole again after to_shared()."""
    with Machine(kvm=kvm) as m:
        region = m.add_memory(DATA_GPA, SIZE)
        with pytest.raises(ConversionError, match="no guest_memfd"):
            SplitSlot(m.vm, region, SPARE, private=True)
        split = SplitSlot(m.vm, region, SPARE, private=False)
        with pytest.raises(ConversionError, match="no split range"):
            split.to_shared()
        for bad in ((SIZE, PAGE_SIZE), (-PAGE_SIZE, PAGE_SIZE), (0, 0), (SIZE - PAGE_SIZE, 2 * PAGE_SIZE)):
            with pytest.raises(ConversionError, match="not inside"):
                split.to_private(*bad)
        assert split.to_private(0, PAGE_SIZE) == 3  # delete, then the range and the right piece
        assert split.live == [SPARE[0], SPARE[1]]
        with pytest.raises(ConversionError, match="still split"):
            split.to_private(PAGE_SIZE, PAGE_SIZE)
        assert split.to_shared() == 3
        assert split.to_private(PAGE_SIZE, PAGE_SIZE) == 4  # left, range, right
        assert split.to_shared() == 4 and split.live == [region.slot]
