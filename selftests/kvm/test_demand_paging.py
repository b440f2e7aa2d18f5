"""Port of tools/testing/selftests/kvm/demand_paging_test.c (userfaultfd MISSING mode), and the same
guest and sizes under vmm's attribute pager.

The C test: memstress puts each vCPU's region in one memslot, registers the shared backing with a
userfaultfd (one per vCPU, or one for all with -a), and a reader thread per userfaultfd answers
each fault with UFFDIO_COPY of a prototype page (EEXIST, another reader winning, is fine); each vCPU
touches every page of its region once (memstress_guest_code, writing) and syncs. Here the guest is
guest/demand_paging.S, which also checks the two u64s it reads per page against the pattern the
page source holds, and the host compares every byte afterwards. run_test() is shared by both
mechanisms: ``uffd`` (any VM type, so it runs on this host too) and ``attributes`` (memory-fault
exits: needs KVM_X86_SW_PROTECTED_VM, nested)."""

from __future__ import annotations

import time

import pytest

from selftests.helpers import expect_done
from vmm import HUGE_PAGE_SIZE, PAGE_SIZE, Kvm, Machine, VmType, load_guest
from vmm.guest import demand
from vmm.guest.demand import PAGED_GPA
from vmm.memory.paging import PageSource
from vmm.memory.uffd_paging import UffdPager
from vmm.tools.pytest_plugin import require_private_mem

TIMEOUT = 120.0
SEED = 0xD00D_F00D
PER_VCPU = 1 << 20  # the C test's -b (default 1G: far too long under TCG for what it shows)


def run_test(kvm: Kvm, mechanism: str, vcpus: int, single_uffd: bool = False, fetch: int = PAGE_SIZE) -> float:
    """demand_paging_test.c: run_test(). Returns the guest's paging rate (pages/s over all vCPUs)."""
    per = max(PER_VCPU, fetch)  # whole fetch units per vCPU
    size = vcpus * per
    data = demand.pattern(PAGED_GPA, size, SEED)
    source = PageSource.from_bytes(data)
    attributes = mechanism == "attributes"
    with Machine(kvm=kvm, vcpus=vcpus, vm_type=VmType.SW_PROTECTED if attributes else VmType.DEFAULT) as m:
        params = demand.params_gpa(m.memory)
        if attributes:
            pager = m.add_demand_paged_memory(PAGED_GPA, size, source, fetch=fetch)
        else:
            m.add_memory(PAGED_GPA, size)
        m.load(load_guest(demand.GUEST), arg=params)
        demand.write_params(m.memory, params, PAGED_GPA, per, SEED, write=True)
        uffd = (
            None
            if attributes
            else UffdPager(m.memory, PAGED_GPA, size, source, fetch=fetch, handlers=1 if single_uffd else vcpus)
        )
        try:
            start = time.perf_counter()
            results = m.run_all(timeout=TIMEOUT)  # memstress_start_vcpu_threads + join
            elapsed = time.perf_counter() - start
        finally:
            if uffd is not None:
                uffd.close()  # uffd_stop_demand_paging()
        for r in results:
            expect_done(r)
        got = m.memory.read(PAGED_GPA, size)
        assert got == data, "a demand-paged page differs from its source"
        if uffd is not None:
            s = uffd.stats
            assert s.copies == size // fetch and s.bytes == size, s
            assert s.faults == s.copies + s.eexist, s
        else:
            assert pager.stats.fetches == size // fetch and pager.stats.bytes == size, pager.report()
    return size // PAGE_SIZE / elapsed


@pytest.mark.parametrize("single_uffd", [False, True], ids=["uffd-per-vcpu", "one-uffd"])
@pytest.mark.parametrize("vcpus", [1, 2, 4])
def test_demand_paging_uffd(kvm: Kvm, vcpus: int, single_uffd: bool) -> None:
    """-u MISSING [-a] -v N: every page faults once through the userfaultfd and is copied once."""
    run_test(kvm, "uffd", vcpus, single_uffd)


@pytest.mark.beyond_kernel
def test_demand_paging_uffd_2m(kvm: Kvm) -> None:
    """2M UFFDIO_COPYs (the C test's page size follows its backing, -s anonymous_thp): one copy per
    2M of the regions, whichever 4K page of it is touched first."""
    run_test(kvm, "uffd", 4, fetch=HUGE_PAGE_SIZE)


@pytest.mark.private_mem
@pytest.mark.beyond_kernel
@pytest.mark.parametrize("fetch", [PAGE_SIZE, HUGE_PAGE_SIZE], ids=["4k", "2m"])
@pytest.mark.parametrize("vcpus", [1, 4])
def test_demand_paging_attributes(kvm: Kvm, vcpus: int, fetch: int) -> None:
    """The same guest and sizes with pages made present by KVM_SET_MEMORY_ATTRIBUTES on
    KVM_EXIT_MEMORY_FAULT instead of UFFDIO_COPY on a userfault."""
    require_private_mem(kvm)
    run_test(kvm, "attributes", vcpus, fetch=fetch)
