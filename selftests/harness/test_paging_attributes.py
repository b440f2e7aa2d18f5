"""Demand paging on memory attributes (vmm.memory.paging): a SW_PROTECTED VM's memslot without
guest_memfd, all PRIVATE ("not present"), so every first guest access exits with
KVM_EXIT_MEMORY_FAULT and the pager fetches the unit from a page source, flips it to shared and
re-enters. Checked: every byte of every page (guest and host) under 1, 2 and 4 vCPUs and both fetch
units, a background prefetch thread racing the vCPUs, a model of guest touches, prefetches and
re-evictions, and the gaps: accesses that KVM itself or host userspace make to a non-present page
see the shared backing, not the source (observed per kernel below), which the pager's userfaultfd
guard turns into page-ins."""

from __future__ import annotations

import os
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
from vmm.kvm.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE
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
    """Each vCPU touches every page of its 1-2 MiB (4K fetches: a fault a page; 2M: one) and checks
    both checked u64s of each; then the host compares every byte with the source. Each unit is
    fetched exactly once, and the faults the guest took are the runner's KVM_EXIT_MEMORY_FAULTs.
    The 2-vCPU runs have the userfaultfd guard on (the guest's accesses never reach it); the others
    leave it off: nested, a 4K fault took 13 ms with it against 3 ms without (7.3, TCG)."""
    per = (2 << 20) if fetch == HUGE_PAGE_SIZE else (1 << 20)
    size = per * vcpus
    data = demand.pattern(PAGED_GPA, size, SEED)
    m, pager, params = paged_machine(private_kvm, vcpus, size, data, fetch=fetch, guard=vcpus == 2)
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
        assert s.guard_faults == 0, f"the guest's own accesses are memory faults, not userfaults: {pager.report()}"
        check_all(m, pager, data)


@pytest.mark.parametrize("fetch", [PAGE_SIZE, HUGE_PAGE_SIZE], ids=["4k", "2m"])
def test_vcpus_faulting_on_one_unit_fetch_it_once(private_kvm: Kvm, fetch: int) -> None:
    """4 vCPUs touch the same 2 MiB at once (demand_paging_test -o): each unit is fetched exactly
    once; the other vCPUs' faults on it wait for that fetch or find it present (stale)."""
    size = HUGE_PAGE_SIZE
    data = demand.pattern(PAGED_GPA, size, SEED)
    m, pager, params = paged_machine(private_kvm, 4, size, data, fetch=fetch, guard=False)
    with m:
        demand.write_params(m.memory, params, PAGED_GPA, size, SEED, overlap=True)
        for r in m.run_all(timeout=TIMEOUT):
            expect_done(r)
        s = pager.stats
        assert s.fetches == size // fetch and s.bytes == size, pager.report()
        assert s.faults > s.fetches, f"no vCPU ever faulted on a unit another one fetched: {pager.report()}"
        check_all(m, pager, data)


def test_background_prefetch_races_the_vcpus(private_kvm: Kvm) -> None:
    """A host thread pages the range in, in random order, while 4 vCPUs fault on it. Each 4K unit
    is fetched exactly once whoever gets there first (a vCPU waits for a fetch in flight; a fault
    on a unit made present after the access began is stale and re-enters), and every byte is right."""
    vcpus, per = 4, 1 << 20
    size = vcpus * per
    data = demand.pattern(PAGED_GPA, size, SEED)
    m, pager, params = paged_machine(private_kvm, vcpus, size, data, guard=False)
    with m:
        demand.write_params(m.memory, params, PAGED_GPA, per, SEED)
        order = list(range(size // PAGE_SIZE))
        random.Random(1).shuffle(order)
        prefetch = pager.start_prefetch(order)
        for r in m.run_all(timeout=TIMEOUT):
            expect_done(r)
        prefetch.join(TIMEOUT)
        s = pager.stats
        assert s.fetches == size // PAGE_SIZE and s.bytes == size, pager.report()
        assert 0 < s.prefetch_fetches < s.fetches, f"no race happened: {pager.report()}"
        check_all(m, pager, data)


def test_prefetch_next_units(private_kvm: Kvm) -> None:
    """--prefetch N: a fault fetches its unit and the N after it in one read, so a sequential sweep
    of 64 pages takes 64 / (N + 1) faults that fetch."""
    size = 64 * PAGE_SIZE
    data = demand.pattern(PAGED_GPA, size, SEED)
    m, pager, params = paged_machine(private_kvm, 1, size, data, prefetch=7, guard=False)
    with m:
        demand.write_params(m.memory, params, PAGED_GPA, size, SEED)
        expect_done(m.run_all(timeout=TIMEOUT)[0])
        assert pager.stats.fetches == 8 and pager.stats.bytes == size, pager.report()
        check_all(m, pager, data)


def test_bad_pager_options(private_kvm: Kvm) -> None:
    """Bad fetch units, prefetch counts, ranges and memslots are refused before anything changes."""
    with Machine(kvm=private_kvm, vm_type=VmType.SW_PROTECTED) as m:
        src = PageSource.from_bytes(bytes(PAGE_SIZE))
        assert m.converter is not None
        m.add_memory(PAGED_GPA, HUGE_PAGE_SIZE)
        for kw, what in (({"fetch": 8192}, "fetch unit"), ({"prefetch": -1}, "prefetch")):
            with pytest.raises(VmmError, match=what):
                DemandPager(m.converter, PAGED_GPA, HUGE_PAGE_SIZE, src, **kw)  # type: ignore[arg-type]
        with pytest.raises(VmmError, match="aligned"):
            DemandPager(m.converter, PAGED_GPA + PAGE_SIZE, PAGE_SIZE, src, fetch=HUGE_PAGE_SIZE)
        with pytest.raises(VmmError, match="not all guest memory"):
            DemandPager(m.converter, PAGED_GPA, 2 * HUGE_PAGE_SIZE, src)
        m.add_private_memory(2 * PAGED_GPA, HUGE_PAGE_SIZE)
        with pytest.raises(VmmError, match="no guest_memfd"):
            DemandPager(m.converter, 2 * PAGED_GPA, HUGE_PAGE_SIZE, src)
        with pytest.raises(VmmError, match="latency"):
            PageSource.from_bytes(b"", latency=-1)
        assert m.converter.is_private(PAGED_GPA, HUGE_PAGE_SIZE) is False  # nothing was marked


# --- the gaps: accesses that do not come from the guest's page walk ------------------------------


def outs_run(kvm: Kvm, guard: bool) -> tuple[list[IoExit], int, DemandPager, bytes]:
    """The guest's `rep outsb` of 16 bytes from the first (non-present) page to port 0x2000, then
    its own read of that page: (the port's exits, the u64 the guest read, pager, source)."""
    size = HUGE_PAGE_SIZE
    data = demand.pattern(PAGED_GPA, size, SEED)
    m, pager, params = paged_machine(kvm, 1, size, data, guard=guard)
    seen: list[IoExit] = []

    def on_io(vcpu: object, exit: IoExit) -> bool:
        seen.append(exit)
        return exit.port == demand.OUTS_PORT

    with m:
        demand.write_params(m.memory, params, PAGED_GPA, size, SEED, mode=demand.OUTS)
        m.handlers.on_io = on_io  # type: ignore[method-assign]
        uc = expect_sync(m.run(timeout=TIMEOUT), 3)
        expect_done(m.run(timeout=TIMEOUT))
        return seen, uc.args[1], pager, data


def port_bytes(seen: list[IoExit]) -> bytes:
    """What the guest's `rep outsb` sent, over however many exits KVM split it into (observed
    nested, SVM under TCG: 16 exits of count 1 on 6.12 and 7.3)."""
    assert all(e.port == demand.OUTS_PORT and e.size == 1 and e.is_write for e in seen), seen
    return b"".join(e.data for e in seen)


def test_string_pio_from_non_present_page_reads_the_backing(private_kvm: Kvm) -> None:
    """Without the guard: KVM's emulator reads a `rep outsb` source by host address
    (kvm_vcpu_read_guest), not through the guest's page walk, so the attributes are never asked
    and no memory fault comes: the port gets the shared backing's bytes (zeros: a punched memfd),
    not the page's. Observed on 6.12 and 7.3. The guest's own read afterwards faults and gets the
    source's data: the same page read two ways, two answers."""
    seen, value, pager, data = outs_run(private_kvm, guard=False)
    sent = port_bytes(seen)
    assert sent == bytes(16), f"KVM's emulator read {sent.hex()} from a non-present page"
    assert value == struct.unpack_from("<Q", data)[0]
    assert pager.stats.faults == 1 and pager.stats.guard_faults == 0, pager.report()


def test_string_pio_from_non_present_page_with_guard(private_kvm: Kvm) -> None:
    """With the pager's userfaultfd guard the emulator's read of the punched page is a userfault:
    the guard thread pages the unit in (fetch, attributes shared) and KVM reads the source's bytes."""
    seen, value, pager, data = outs_run(private_kvm, guard=True)
    sent = port_bytes(seen)
    assert sent == data[:16], f"port got {sent.hex()}, the page holds {data[:16].hex()}"
    assert value == struct.unpack_from("<Q", data)[0]
    assert pager.stats.guard_faults >= 1 and pager.stats.fetches == 1, pager.report()


def test_guest_executes_from_non_present_page(private_kvm: Kvm) -> None:
    """An instruction fetch from a non-present page is a guest access like any other: a
    KVM_EXIT_MEMORY_FAULT, a page-in, and the code runs (mov $0x1234abcd, %eax; ret)."""
    code = bytes.fromhex("b8cdab3412c3")
    data = code + bytes(PAGE_SIZE - len(code))
    m, pager, params = paged_machine(private_kvm, 1, PAGE_SIZE, data, guard=False)
    with m:
        demand.write_params(m.memory, params, PAGED_GPA, PAGE_SIZE, SEED, mode=demand.CALL)
        uc = expect_sync(m.run(timeout=TIMEOUT), 4)
        assert uc.args[1] == 0x1234ABCD
        expect_done(m.run(timeout=TIMEOUT))
        assert pager.stats.faults >= 1 and pager.stats.fetches == 1, pager.report()


def host_syscall_read(view: memoryview) -> bytes:
    """Read guest memory the way a host syscall does (os.write from the mapping into a pipe: the
    kernel's copy_from_user, with the GIL released, as vhost or a pwrite to disk would)."""
    r, w = os.pipe()
    try:
        os.write(w, view)
        return os.read(r, len(view))
    finally:
        os.close(r)
        os.close(w)


def test_host_reads_of_non_present_pages(private_kvm: Kvm) -> None:
    """Host userspace: GuestMemory.read/write refuse a non-present range (the attribute map says
    PRIVATE there, as for private memory). A syscall reading the shared backing directly sees
    zeros without the guard; with it, the copy blocks until the guard thread has paged the unit in,
    then sees the source. (Python code itself must not touch a non-present page with the guard on:
    it would fault holding the GIL the guard thread needs. GuestMemory's refusal keeps it off.)"""
    data = demand.pattern(PAGED_GPA, HUGE_PAGE_SIZE, SEED)
    for guard in (False, True):
        m, pager, _ = paged_machine(private_kvm, 1, HUGE_PAGE_SIZE, data, guard=guard)
        with m:
            with pytest.raises(VmmError, match="private"):
                m.memory.read(PAGED_GPA + PAGE_SIZE, 8)
            with pytest.raises(VmmError, match="private"):
                m.memory.write(PAGED_GPA, b"x")
            raw = host_syscall_read(m.memory.shared_view(PAGED_GPA + PAGE_SIZE, 16))
            if guard:
                assert raw == data[PAGE_SIZE : PAGE_SIZE + 16] and pager.stats.guard_faults == 1, pager.report()
                assert m.memory.read(PAGED_GPA + PAGE_SIZE, 16) == raw  # present now
            else:
                assert raw == bytes(16) and pager.stats.fetches == 0, pager.report()


def test_repeated_fault_on_present_page_is_an_error(private_kvm: Kvm) -> None:
    """Bounded re-entry: a fault on a page vmm's map says is present, repeated with nothing paged
    in between, means KVM and vmm disagree; the pager raises MemoryFaultError instead of looping.
    Made here by marking a present page PRIVATE in KVM behind the pager's back."""
    data = demand.pattern(PAGED_GPA, PAGE_SIZE, SEED)
    m, pager, params = paged_machine(private_kvm, 1, PAGE_SIZE, data, guard=False)
    with m:
        demand.write_params(m.memory, params, PAGED_GPA, PAGE_SIZE, SEED)
        pager.page_in(PAGED_GPA, PAGE_SIZE)
        m.vm.set_memory_attributes(PAGED_GPA, PAGE_SIZE, KVM_MEMORY_ATTRIBUTE_PRIVATE)
        with pytest.raises(MemoryFaultError, match="repeats"):
            m.run(timeout=TIMEOUT)


# --- a model of touches, prefetches and re-evictions ---------------------------------------------

MODEL_PAGES = 48


class PagingModel(RuleBasedStateMachine):
    """2 vCPUs touch (and check) page ranges through COMMANDS; the host prefetches and re-evicts
    ranges, alone or racing a vCPU. The model: the set of present pages and the bytes fetched so
    far (each page-in fetches exactly the pages that were missing). A race makes its pages'
    presence either way; the pager's state then decides them, and the bytes must still add up."""

    def __init__(self, kvm: Kvm) -> None:
        super().__init__()
        size = MODEL_PAGES * PAGE_SIZE
        self.data = demand.pattern(PAGED_GPA, size, SEED)
        self.m, self.pager, self.params = paged_machine(kvm, 2, size, self.data, guard=False)
        demand.write_params(self.m.memory, self.params, PAGED_GPA, 0, SEED, mode=demand.COMMANDS)
        for v in range(2):
            expect_sync(self.m.run(v, timeout=TIMEOUT), 2)
        self.present: set[int] = set()
        self.fetched = 0  # bytes the model says were fetched

    def _touch(self, vcpu: int, first: int, n: int) -> None:
        demand.command(self.m.memory, self.params, vcpu, PAGED_GPA + first * PAGE_SIZE, n)
        expect_sync(self.m.run(vcpu, timeout=TIMEOUT), 2)

    def _bring(self, pages: range) -> None:
        self.fetched += PAGE_SIZE * len(set(pages) - self.present)
        self.present |= set(pages)

    pages = st.tuples(st.integers(0, MODEL_PAGES - 1), st.integers(1, 8)).map(
        lambda t: range(t[0], min(MODEL_PAGES, t[0] + t[1]))
    )

    @rule(vcpu=st.integers(0, 1), r=pages)
    def touch(self, vcpu: int, r: range) -> None:
        self._touch(vcpu, r.start, len(r))
        self._bring(r)

    @rule(r=pages)
    def prefetch(self, r: range) -> None:
        self.pager.page_in(PAGED_GPA + r.start * PAGE_SIZE, len(r) * PAGE_SIZE)
        self._bring(r)

    @rule(r=pages)
    def evict(self, r: range) -> None:
        self.pager.evict(PAGED_GPA + r.start * PAGE_SIZE, len(r) * PAGE_SIZE)
        self.present -= set(r)

    @rule(vcpu=st.integers(0, 1), touched=pages, evicted=pages)
    def touch_racing_evict(self, vcpu: int, touched: range, evicted: range) -> None:
        t = threading.Thread(target=self._touch, args=(vcpu, touched.start, len(touched)))
        t.start()
        self.pager.evict(PAGED_GPA + evicted.start * PAGE_SIZE, len(evicted) * PAGE_SIZE)
        t.join(TIMEOUT)
        assert not t.is_alive()
        # the guest checked every touched page; which of the overlap ends present depends on order
        self.present -= set(evicted)
        now = {(a - PAGED_GPA) // PAGE_SIZE for s, e in self.pager.present() for a in range(s, e, PAGE_SIZE)}
        either = set(touched) & set(evicted)
        self.present |= set(touched) - set(evicted) | (now & either)
        self.fetched = self.pager.stats.bytes  # how often the overlap was fetched depends on order too
        assert self.fetched >= PAGE_SIZE * len(set(touched) - set(evicted))

    @invariant()
    def matches_model(self) -> None:
        now = {(a - PAGED_GPA) // PAGE_SIZE for s, e in self.pager.present() for a in range(s, e, PAGE_SIZE)}
        assert now == self.present, f"pager has {sorted(now)}, model {sorted(self.present)}"
        assert self.pager.stats.bytes == self.fetched, f"{self.pager.report()}; model fetched {self.fetched}"
        for s, e in self.pager.present():
            off = s - PAGED_GPA
            assert self.m.memory.read(s, e - s) == self.data[off : off + e - s]

    def teardown(self) -> None:
        for v in range(2):
            demand.command(self.m.memory, self.params, v, 0, 0)
            expect_done(self.m.run(v, timeout=TIMEOUT))
        self.m.close()


def test_paging_model(private_kvm: Kvm) -> None:
    """The model above: 6 examples of up to 20 steps."""
    run_state_machine_as_test(
        lambda: PagingModel(private_kvm),
        settings=settings(
            max_examples=6, stateful_step_count=20, deadline=None, suppress_health_check=list(HealthCheck)
        ),
    )
