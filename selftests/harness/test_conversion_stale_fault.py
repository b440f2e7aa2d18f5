"""Stale memory faults: a conversion racing a vCPU access (REFERENCE.md §4).

On a KVM_X86_SW_PROTECTED_VM, KVM takes private-vs-shared from the attributes alone: the fault
path reads them when the access begins (arch/x86/kvm/mmu/mmu.c, kvm_mmu_page_fault(): sets
PFERR_PRIVATE_ACCESS from kvm_mem_is_private()) and re-checks them in kvm_faultin_pfn(); when a
KVM_SET_MEMORY_ATTRIBUTES landed in between, KVM_RUN exits with KVM_EXIT_MEMORY_FAULT whose flags
are the attributes *before* the conversion. Such a fault is stale: re-entering is the whole fix,
and converting "back" to what it says would undo the conversion that raced it.

There is no kernel selftest for this race; the closest are private_mem_conversions_test.c
(conversions under running vCPUs) and private_mem_kvm_exits_test.c (the exits themselves). Here:
the race provoked for real (a vCPU hammering loads and stores while the host converts its pages
back and forth), the handler's decision replayed deterministically on a fault the kernel
delivered, and the no-progress guard (the same fault again with nothing converted in between)."""

from __future__ import annotations

import errno
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from vmm import (
    PAGE_SIZE,
    Backing,
    ConversionPolicy,
    ExitHandlers,
    ExitReason,
    Kvm,
    Machine,
    MemoryFaultError,
    PrivateMemoryHandlers,
    UcallCmd,
    VmType,
    load_guest,
)
from vmm.kvm.exits import MemoryFaultExit
from vmm.kvm.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEMORY_EXIT_FLAG_PRIVATE
from vmm.memory.faults import MAX_REPEATS

from helpers import expect_sync

pytestmark = pytest.mark.private_mem

BASE = 1 << 32
NPAGES = 4
SIZE = NPAGES * PAGE_SIZE
LAST_U64 = 0xFF8
MODE_HAMMER = 1  # guest/private_mem_kvm_exits.S: rcx = gpa | mode | npages << 2
TIMEOUT = 120.0
RACE_BUDGET_S = 60.0  # stop converting after this long even if no stale fault was seen
RACE_MIN_CONVERSIONS = 100
RACE_WANTED_STALE = 3


def hammer_arg(gpa: int, npages: int) -> int:
    return gpa | MODE_HAMMER | npages << 2


def fill_shared(m: Machine, gpa: int, npages: int) -> None:
    """The host's copy of the guest's pattern: the u64s at 0 and 0xff8 of each page hold their GPA."""
    for p in range(npages):
        page = gpa + p * PAGE_SIZE
        m.memory.shared_view(page, 8)[:] = struct.pack("<Q", page)  # private now: its shared copy
        m.memory.shared_view(page + LAST_U64, 8)[:] = struct.pack("<Q", page + LAST_U64)


def shared_pattern_intact(m: Machine, gpa: int, npages: int) -> bool:
    for p in range(npages):
        page = gpa + p * PAGE_SIZE
        if struct.unpack("<Q", m.memory.shared_view(page, 8))[0] != page:
            return False
        if struct.unpack("<Q", m.memory.shared_view(page + LAST_U64, 8))[0] != page + LAST_U64:
            return False
    return True


@contextmanager
def hammer_machine(kvm: Kvm, npages: int) -> Iterator[tuple[Machine, PrivateMemoryHandlers, int]]:
    """A SW_PROTECTED machine with vmm's production handlers, conversions without discard (so the
    shared and the private copy both keep the pattern), ``npages`` private pages at BASE that the
    hammer guest has filled (it stopped at SYNC 1), and the shared copy filled by the host. Yields
    the machine, its handlers and the GPA of the guest's stop flag."""
    with Machine(kvm=kvm, vm_type=VmType.SW_PROTECTED, policy=ConversionPolicy(discard=False)) as m:
        handlers = m.handlers
        assert isinstance(handlers, PrivateMemoryHandlers) and m.converter is not None
        m.add_private_memory(BASE, npages * PAGE_SIZE)
        m.load(load_guest("private_mem_kvm_exits"), arg=hammer_arg(BASE, npages))
        stop_flag = m.vcpus[0].get_regs().rdx  # the guest polls the first free GPA of slot 0
        m.converter.convert(BASE, npages * PAGE_SIZE, True)
        expect_sync(m.run(timeout=TIMEOUT), 1)  # the guest wrote the pattern to the private copy
        fill_shared(m, BASE, npages)
        yield m, handlers, stop_flag


def test_conversion_race_faults_are_stale(private_kvm: Kvm) -> None:
    """The race for real (no kernel counterpart; cf. private_mem_conversions_test.c). One vCPU
    loads, checks and stores back a pattern over 4 pages while a host thread converts them
    private<->shared (under the handlers' lock, as vmm serialises conversions) until stale faults
    were seen or the time budget ran out. Checks: the guest saw the pattern on every access and
    finished; KVM did deliver racing faults (stale_faults > 0); every fault was re-entered, none
    converted anything (the handler made no conversion of its own and never undid the host's);
    the shared copy still holds the pattern."""
    with hammer_machine(private_kvm, NPAGES) as (m, handlers, stop_flag):
        conv = m.converter
        assert conv is not None
        before = conv.stats.conversions
        race = {"host": 0, "undone": 0, "error": None}
        enough = threading.Event()

        def convert_back_and_forth() -> None:
            try:
                private = True
                deadline = time.monotonic() + RACE_BUDGET_S
                while time.monotonic() < deadline and not enough.is_set():
                    with handlers.lock:
                        if conv.is_private(BASE, SIZE) is not private:
                            race["undone"] += 1  # somebody else converted: only a fault handler could
                        private = not private
                        conv.convert(BASE, SIZE, private)
                    race["host"] += 1
                    if race["host"] >= RACE_MIN_CONVERSIONS and handlers.counts.stale_faults >= RACE_WANTED_STALE:
                        break
                    time.sleep(0.0005)  # let the vCPU thread take the lock for its faults
            except BaseException as e:  # reported by the main thread
                race["error"] = e
            finally:
                m.memory.write(stop_flag, struct.pack("<Q", 1))

        host = threading.Thread(target=convert_back_and_forth, name="converter")
        start = time.monotonic()
        host.start()
        try:
            done = m.run(timeout=TIMEOUT + RACE_BUDGET_S)
        finally:
            enough.set()
            host.join()
        elapsed = time.monotonic() - start
        if race["error"] is not None:
            raise race["error"]  # type: ignore[misc]
        rounds = expect_sync(done, 2).args[1]
        assert m.run(timeout=TIMEOUT).cmd == UcallCmd.DONE
        counts = handlers.counts
        summary = (
            f"{race['host']} host conversions in {elapsed:.1f} s, {rounds} guest rounds, "
            f"{counts.memory_faults} memory faults, {counts.stale_faults} stale"
        )
        print(summary)
        assert counts.stale_faults > 0, f"no conversion raced a vCPU access: {summary}"
        assert counts.stale_faults == counts.memory_faults, f"a fault was not treated as stale: {summary}"
        assert race["undone"] == 0, f"a fault handler undid {race['undone']} host conversions: {summary}"
        assert conv.stats.conversions - before == race["host"], f"the handler converted on its own: {summary}"
        assert shared_pattern_intact(m, BASE, NPAGES)


def real_private_fault(kvm: Kvm, gpa: int) -> MemoryFaultExit:
    """A fault the kernel delivers: private_mem_kvm_exits_test's second case at ``gpa`` (private
    attribute, memslot without guest_memfd), one bare KVM_RUN."""
    with Machine(kvm=kvm, vm_type=VmType.SW_PROTECTED, handlers=ExitHandlers()) as m:
        m.add_memory(gpa, PAGE_SIZE, Backing.SHARED)
        m.load(load_guest("private_mem_kvm_exits"), arg=gpa)
        m.vm.set_memory_attributes(gpa, PAGE_SIZE, KVM_MEMORY_ATTRIBUTE_PRIVATE)
        vcpu = m.vcpus[0]
        err, reason = vcpu.run_raw()
        fault = vcpu.exit(reason)
    assert err == errno.EFAULT, f"KVM_RUN: expected EFAULT, got {errno.errorcode.get(err, err)}"
    assert isinstance(fault, MemoryFaultExit) and fault.reason == ExitReason.MEMORY_FAULT, f"got {fault}"
    assert (fault.flags, fault.gpa, fault.size) == (KVM_MEMORY_EXIT_FLAG_PRIVATE, gpa, PAGE_SIZE), f"got {fault}"
    return fault


def test_stale_fault_replayed_is_reentered(private_kvm: Kvm) -> None:
    """The race's outcome made deterministic (no kernel counterpart). A private fault the kernel
    delivered for BASE is handed to the production handler of a machine where BASE is a guest_memfd
    page: (1) while the map says private (it agrees with the fault), (2) after the host converted
    BASE to shared, i.e. exactly what a fault that began before that conversion reports. Both times
    the handler re-enters (returns True), counts a stale fault and converts nothing: the host's
    conversion stands. The vCPU then really re-enters and reads the page through the shared copy.
    Also: three identical faults with a conversion between each are three races, not a loop."""
    fault = real_private_fault(private_kvm, BASE)
    with hammer_machine(private_kvm, 1) as (m, handlers, stop_flag):
        conv, vcpu = m.converter, m.vcpus[0]
        assert conv is not None
        made = conv.stats.conversions

        assert conv.is_private(BASE) is True
        assert handlers.on_memory_fault(vcpu, fault) is True
        assert handlers.counts.stale_faults == 1 and conv.stats.conversions == made

        conv.convert(BASE, PAGE_SIZE, False)  # the conversion the access raced with
        made = conv.stats.conversions
        assert handlers.on_memory_fault(vcpu, fault) is True
        assert handlers.counts.stale_faults == 2
        assert conv.stats.conversions == made, "the handler converted back what the host had just converted"
        assert conv.is_private(BASE) is False, conv.map_state(BASE)

        m.memory.write(stop_flag, struct.pack("<Q", 1))
        assert expect_sync(m.run(timeout=TIMEOUT), 2).args[1] == 1  # one round over the page, pattern seen
        assert m.run(timeout=TIMEOUT).cmd == UcallCmd.DONE
        assert handlers.counts.memory_faults == 2  # the re-entry itself needed no further exit

        for to_private in (True, False, True):  # MAX_REPEATS identical faults, a conversion before each
            conv.convert(BASE, PAGE_SIZE, to_private)
            assert handlers.on_memory_fault(vcpu, fault) is True
        assert handlers.counts.stale_faults == 2 + MAX_REPEATS


def test_fault_without_progress_raises(private_kvm: Kvm) -> None:
    """No kernel counterpart (vmm's guard; the exit is private_mem_kvm_exits_test's first case):
    BASE was converted to private and read, then its memslot is deleted. Every re-entry faults
    again with the same exit and nothing converts in between, so after MAX_REPEATS exits the
    handlers raise MemoryFaultError naming the fault, the missing memslot and the map (private)."""
    with Machine(kvm=private_kvm, vm_type=VmType.SW_PROTECTED) as m:
        handlers, conv = m.handlers, m.converter
        assert isinstance(handlers, PrivateMemoryHandlers) and conv is not None
        (region,) = m.add_private_memory(BASE, PAGE_SIZE)
        m.load(load_guest("private_mem_kvm_exits"), arg=BASE)
        conv.convert(BASE, PAGE_SIZE, True)
        assert expect_sync(m.run(timeout=TIMEOUT), 1).args[1] == 0  # a fresh private page reads zeros
        m.memory.delete(region.slot)
        made = conv.stats.conversions
        with pytest.raises(MemoryFaultError) as e:
            m.run(timeout=TIMEOUT)
        message = str(e.value)
        assert (
            f"KVM_EXIT_MEMORY_FAULT private flags={KVM_MEMORY_EXIT_FLAG_PRIVATE:#x} gpa={BASE:#x} "
            f"size={PAGE_SIZE:#x} repeats {MAX_REPEATS} times" in message
        ), message
        assert "no memslot" in message, message
        assert "map: [" in message and f"{BASE + PAGE_SIZE:#x}) private" in message, message
        assert handlers.counts.memory_faults == handlers.counts.stale_faults == MAX_REPEATS
        assert m.runners[0].exit_counts[ExitReason.MEMORY_FAULT] == MAX_REPEATS
        assert conv.stats.conversions == made
