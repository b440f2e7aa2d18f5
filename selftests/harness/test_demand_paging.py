"""Demand paging on memory attributes (vmm.memory.paging): a SW_PROTECTED VM's memslot without
guest_memfd, all PRIVATE ("not present"), so every first guest access exits with
KVM_EXIT_MEMORY_FAULT and the pager fetches the unit from a page source, flips it to shared and
re-enters. Checked: every byte of every page (guest and host) under 1, 2 and 4 vCPUs and both fetch
units, a background prefetch thread racing the vCPUs, a model of guest touches, prefetches and
re-evictions, and the gaps: accesses that KVM itself or host userspace make to a non-present page
see the shared backing, not the source (observed per kernel below), which the pager's userfaultfd
guard turns into page-ins."""

from __future__ import annotations

import random
import struct
import threading

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from selftests.helpers import expect_done, expect_sync
from vmm import HUGE_PAGE_SIZE, PAGE_SIZE, ExitReason, Kvm, Machine, MemoryFaultError, VmmError, VmType, load_guest
from vmm.guest import demand
from vmm.guest.demand import PAGED_GPA
from vmm.kvm.exits import IoExit
from vmm.memory.paging import DemandPager, PageSource

pytestmark = pytest.mark.private_mem

TIMEOUT = 120.0
SEED = 0x5EED_0000_A5A5_0F0F


def paged_machine(kvm: Kvm, vcpus: int, size: int, data: bytes, **opts: object) -> tuple[Machine, DemandPager, int]:
    """A SW_PROTECTED machine with the demand_paging guest and [PAGED_GPA, +size) paged from ``data``;
    returns (machine, pager, GPA of the guest's parameter block)."""
    m = Machine(kvm=kvm, vm_type=VmType.SW_PROTECTED, vcpus=vcpus)
    try:
        pager = m.add_demand_paged_memory(PAGED_GPA, size, PageSource.from_bytes(data), **opts)
        params = demand.params_gpa(m.memory)
        m.load(load_guest(demand.GUEST), arg=params)
    except BaseException:
        m.close()
        raise
    return m, pager, params


def check_all(m: Machine, pager: DemandPager, data: bytes) -> None:
    """Every byte of the paged range, read by the host, equals the source."""
    got = m.memory.read(PAGED_GPA, len(data))
    if got != data:
        i = next(i for i in range(0, len(data), PAGE_SIZE) if got[i : i + PAGE_SIZE] != data[i : i + PAGE_SIZE])
        pytest.fail(f"page {PAGED_GPA + i:#x} differs from its source ({pager.report()})")


@pytest.mark.parametrize("fetch", [PAGE_SIZE, HUGE_PAGE_SIZE], ids=["4k", "2m"])
@pytest.mark.parametrize("vcpus", [1, 2, 4])
def test_every_page(private_kvm: Kvm, vcpus: int, fetch: int) -> None:
    """Each vCPU touches every page of its 2 MiB (4K fetches: 512 faults each; 2M: one) and checks
    both checked u64s of each; then the host compares every byte with the source. Each unit is
    fetched exactly once, and the faults the guest took are the runner's KVM_EXIT_MEMORY_FAULTs."""
    per = 2 << 20
    size = per * vcpus
    data = demand.pattern(PAGED_GPA, size, SEED)
    m, pager, params = paged_machine(private_kvm, vcpus, size, data, fetch=fetch)
    with m:
        demand.write_params(m.memory, params, PAGED_GPA, per, SEED, write=True)
        results = m.run_all(timeout=TIMEOUT)
        for r in results:
            expect_done(r)
        s = pager.stats
        assert s.fetches == size // fetch and s.bytes == size, pager.report()
        assert pager.present() == [(PAGED_GPA, PAGED_GPA + size)]
        faults = sum(r.exit_counts[ExitReason.MEMORY_FAULT] for r in m.runners)
        assert faults == s.faults and s.faults >= size // fetch, pager.report()
        check_all(m, pager, data)
