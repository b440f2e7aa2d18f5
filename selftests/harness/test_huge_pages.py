"""Does KVM really install huge pages, and does vmm's 2M conversion policy keep them? Read from the
VM's binary stats (pages_2m: the 2M mappings KVM holds now) while guest/memory_toucher.S touches
an 8 MiB private-capable region at DATA_GPA whose shared side is a THP memfd.

How it stays non-flaky: KVM maps a gfn at 2M only where the host maps the memfd with a 2M PMD (it
walks the host page tables: host_pfn_mapping_level), the 2M range's attributes are uniform
(kvm_range_has_memory_attributes / the lpage "mixed" flag) and, for private memory, the
guest_memfd folio is 2M (never on 6.12 and 7.3: order-0 folios). So each check compares pages_2m
with what the host maps (/proc/self/smaps ShmemPmdMapped of the memfd mapping) at that moment,
instead of hoping for THP: a failed THP allocation or a khugepaged collapse changes both sides.
The host side is read before and after the stats, and the pass is repeated if it moved meanwhile.

memfd THP needs /sys/kernel/mm/transparent_hugepage/shmem_enabled at advise (or always/within_size):
THP=always in the kernel config covers anonymous memory only, and shmem's default is never. The
fixture sets advise for the test where it can (root, as in the nested kernel) and restores it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vmm import Kvm, Machine, VmType
from vmm.guest.layout import DATA_GPA
from vmm.guest.toucher import Toucher
from vmm.kvm import syscalls
from vmm.kvm.stats import Stats
from vmm.memory.convert import ConversionPolicy, Granularity
from vmm.memory.regions import HUGE_PAGE_SIZE, PAGE_SIZE, HugePages
from vmm.tools.pytest_plugin import require

from helpers import expect_sync

pytestmark = pytest.mark.private_mem

SHMEM_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
CHUNKS = 4  # 2M chunks in the data region
SIZE = CHUNKS * HUGE_PAGE_SIZE


@pytest.fixture
def shmem_thp() -> Iterator[None]:
    """shmem_enabled at advise or better for the test: memfds then get 2M folios after
    MADV_HUGEPAGE (HugePages.THP), and their mappings 2M-aligned addresses."""
    require(SHMEM_ENABLED.exists(), f"transparent huge pages ({SHMEM_ENABLED})")
    before = SHMEM_ENABLED.read_text().split("[")[1].split("]")[0]
    if before in ("always", "within_size", "advise", "force"):
        yield
        return
    try:
        SHMEM_ENABLED.write_text("advise")
    except OSError:
        pytest.skip(f"needs shmem THP: {SHMEM_ENABLED} is {before} and not writable here")
    try:
        yield
    finally:
        SHMEM_ENABLED.write_text(before)


class HugeProbe:
    """The machine, its toucher, the VM's stats and the host mapping of the data region."""

    def __init__(self, m: Machine, stats: Stats) -> None:
        self.m, self.stats = m, stats
        (region,) = m.add_private_memory(DATA_GPA, SIZE, hugepages=HugePages.THP)
        self.hva = region.userspace_addr
        self.toucher = Toucher(m, DATA_GPA, SIZE, PAGE_SIZE)
        assert m.converter is not None
        self.converter = m.converter

    def host_2m(self) -> int:
        """2M chunks of the data region the host maps with a PMD."""
        return syscalls.smaps_field(self.hva, "ShmemPmdMapped") // HUGE_PAGE_SIZE

    def touch(self) -> tuple[int, int, int]:
        """One pass of the guest over the region: (pages_2m, pages_4k, host 2M chunks), read while
        the host side holds still (at most 3 passes)."""
        for _ in range(3):
            expect_sync(self.m.run(timeout=60), 1)
            host = self.host_2m()
            snap = self.stats.read()
            if self.host_2m() == host:
                return snap["pages_2m"], snap["pages_4k"], host
        pytest.fail("the host's THP mapping of the data region kept changing (khugepaged?)")

    def convert(self, gpa: int, size: int, to_private: bool) -> None:
        """vmm's conversion (attributes + PUNCH_HOLE of the side no longer used)."""
        unit = Granularity.HUGE if size % HUGE_PAGE_SIZE == 0 else Granularity.EXACT
        self.converter.convert(gpa, size, to_private, ConversionPolicy(granularity=unit))


@pytest.fixture
def probe(private_kvm: Kvm, shmem_thp: None) -> Iterator[HugeProbe]:
    with Machine(kvm=private_kvm, vm_type=VmType.SW_PROTECTED) as m, m.vm.stats() as stats:
        p = HugeProbe(m, stats)
        try:
            yield p
        finally:
            p.toucher.release()


def test_thp_memfd_is_mapped_2m(probe: HugeProbe) -> None:
    """Shared memory on a THP memfd: every chunk the host maps 2M, KVM maps 2M (slot 0, a plain
    memfd, adds only 4K mappings), and the guest reads each page through it."""
    pages_2m, _, host = probe.touch()
    assert host == CHUNKS, f"the host mapped {host} of {CHUNKS} chunks with THP: no free 2M folios?"
    assert pages_2m == host


def test_guest_memfd_is_mapped_4k(probe: HugeProbe) -> None:
    """A 2M-aligned chunk made private is served from guest_memfd, whose folios are order-0 on 6.12
    and 7.3 (kvm_gmem_get_pfn's max_order 0): KVM maps it with 512 4K pages, not one 2M page."""
    before_2m, before_4k, _ = probe.touch()
    probe.convert(DATA_GPA + HUGE_PAGE_SIZE, HUGE_PAGE_SIZE, True)
    pages_2m, pages_4k, host = probe.touch()
    assert host == CHUNKS - 1  # its shared THP was punched out
    assert pages_2m == before_2m - 1 == host
    assert pages_4k >= before_4k + HUGE_PAGE_SIZE // PAGE_SIZE


def test_2m_conversion_keeps_2m_where_4k_splits(probe: HugeProbe) -> None:
    """vmm's 2M policy claim: a 2M-aligned round trip (private and back) leaves the chunk mapped
    2M again, while a 4K round trip inside a chunk splits it for good: the 4K PUNCH_HOLE splits
    the memfd's huge folio, and KVM follows the host. While the 4K page is private the chunk's
    attributes are mixed, so KVM must map the shared rest 4K even where the host still has 2M."""
    probe.touch()
    c1, c2 = DATA_GPA + HUGE_PAGE_SIZE, DATA_GPA + 2 * HUGE_PAGE_SIZE
    probe.convert(c1, HUGE_PAGE_SIZE, True)
    probe.convert(c2, PAGE_SIZE, True)
    pages_2m, _, host = probe.touch()
    assert pages_2m == CHUNKS - 2 and host == CHUNKS - 2, (pages_2m, host)
    probe.convert(c1, HUGE_PAGE_SIZE, False)  # 2M back: a fresh huge folio fills the punched chunk
    probe.convert(c2, PAGE_SIZE, False)  # 4K back: attributes uniform again, the folio stays split
    pages_2m, _, host = probe.touch()
    assert pages_2m == host, (pages_2m, host)
    assert pages_2m == CHUNKS - 1, f"expected chunk 1 back at 2M and chunk 2 split: {pages_2m} 2M mappings"
