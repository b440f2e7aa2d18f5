"""Port of tools/testing/selftests/kvm/x86_64/private_mem_kvm_exits_test.c (6.12).

A guest keeps reading one private page (guest/private_mem_kvm_exits.S, the kernel's
guest_repeatedly_read()) that KVM cannot map: its memslot was deleted under the running vCPU, or
the memslot never had a guest_memfd. KVM_RUN must fail with EFAULT and report
KVM_EXIT_MEMORY_FAULT with flags KVM_MEMORY_EXIT_FLAG_PRIVATE, the page's GPA and size 4K,
exactly as the kernel test asserts. The vCPU is entered with a bare KVM_RUN here (the kernel's
run_vcpu_get_exit_reason()), so the errno is checked too, not only vmm's reading of it.

Beyond the kernel test: vmm's production exit handlers (vmm.memory.faults.PrivateMemoryHandlers) must
stop on the same unresolvable fault with a MemoryFaultError that names the fault and the VMM's
attribute map, instead of re-entering the guest forever."""

from __future__ import annotations

import errno
import threading
import time

import pytest

from vmm import (
    PAGE_SIZE,
    Backing,
    ExitHandlers,
    ExitReason,
    Kvm,
    Machine,
    MemoryFaultError,
    PrivateMemoryHandlers,
    Ucall,
    UcallCmd,
    Vcpu,
    VmType,
    load_guest,
)
from vmm.kvm.exits import MemoryFaultExit
from vmm.kvm.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEMORY_EXIT_FLAG_PRIVATE
from vmm.memory.faults import MAX_REPEATS

pytestmark = pytest.mark.private_mem

# The kernel test's constants: one page at 3 GiB in slot 10.
EXITS_TEST_GPA = 0xC0000000
EXITS_TEST_NPAGES = 1
EXITS_TEST_SIZE = EXITS_TEST_NPAGES * PAGE_SIZE
EXITS_TEST_SLOT = 10
TIMEOUT = 60.0  # seconds; TCG inside the nested kernel is slow, a pass takes well under one


def enter_once(vcpu: Vcpu) -> tuple[int, int]:
    """run_vcpu_get_exit_reason(): one bare KVM_RUN; returns (errno or 0, kvm_run.exit_reason)."""
    vcpu.thread_ident = threading.get_ident()  # so kick() can interrupt a run that never exits
    return vcpu.run_raw()


def expect_private_fault(vcpu: Vcpu, err: int, reason: int) -> None:
    """The kernel test's assertions on the exit, field by field."""
    assert err == errno.EFAULT, f"KVM_RUN: expected EFAULT, got {errno.errorcode.get(err, err)}"
    assert reason == ExitReason.MEMORY_FAULT, f"expected KVM_EXIT_MEMORY_FAULT, got {vcpu.exit(reason)}"
    fault = vcpu.exit(reason)
    assert isinstance(fault, MemoryFaultExit)
    assert fault.flags == KVM_MEMORY_EXIT_FLAG_PRIVATE, f"flags {fault.flags:#x} in {fault}"
    assert fault.gpa == EXITS_TEST_GPA, f"gpa {fault.gpa:#x} in {fault}"
    assert fault.size == EXITS_TEST_SIZE, f"size {fault.size:#x} in {fault}"


def protected_machine(kvm: Kvm, handlers: ExitHandlers | None) -> Machine:
    """vm_create_shape_with_one_vcpu(protected_vm_shape, ...): a KVM_X86_SW_PROTECTED_VM."""
    return Machine(kvm=kvm, vm_type=VmType.SW_PROTECTED, vcpus=1, handlers=handlers)


def test_private_access_memslot_deleted(private_kvm: Kvm) -> None:
    """private_mem_kvm_exits_test.c: test_private_access_memslot_deleted(). A private page in a
    guest_memfd slot reads as zeros; then a vCPU thread keeps reading it while the main thread
    deletes the slot: KVM_RUN fails with EFAULT, KVM_EXIT_MEMORY_FAULT, flags PRIVATE, gpa, 4K.
    One extra check (the private read works before the deletion) sits in the kernel case, so the
    test is not marked beyond_kernel."""
    with protected_machine(private_kvm, ExitHandlers()) as m:
        m.add_memory(EXITS_TEST_GPA, EXITS_TEST_SIZE, Backing.GUEST_MEMFD, slot=EXITS_TEST_SLOT)
        m.load(load_guest("private_mem_kvm_exits"), arg=EXITS_TEST_GPA)
        m.vm.set_memory_attributes(EXITS_TEST_GPA, EXITS_TEST_SIZE, KVM_MEMORY_ATTRIBUTE_PRIVATE)

        # Not in the kernel test: the private read works while the slot exists.
        uc = m.run(timeout=TIMEOUT)
        assert isinstance(uc, Ucall) and uc.cmd == UcallCmd.SYNC and uc.stage == 1, f"got {uc}"
        assert uc.args[1] == 0, f"a fresh private page read {uc.args[1]:#x}, not zeros"

        vcpu = m.vcpus[0]
        result: list[tuple[int, int]] = []
        thread = threading.Thread(target=lambda: result.append(enter_once(vcpu)), name="vcpu0")
        thread.start()
        while vcpu.thread_ident != thread.ident:
            time.sleep(0.001)
        time.sleep(0.05)  # let it reach the read loop (a fault comes either way, as in the kernel test)
        m.memory.delete(EXITS_TEST_SLOT)
        thread.join(TIMEOUT)
        if thread.is_alive():
            vcpu.kick()
            thread.join()
            pytest.fail(f"the vCPU kept running {TIMEOUT} s after its private memslot was deleted")
        expect_private_fault(vcpu, *result[0])


def test_private_access_memslot_not_private(private_kvm: Kvm) -> None:
    """private_mem_kvm_exits_test.c: test_private_access_memslot_not_private(). The page is
    private but its memslot has no guest_memfd (flags 0): the very first read fails with EFAULT,
    KVM_EXIT_MEMORY_FAULT, flags PRIVATE, gpa, 4K."""
    with protected_machine(private_kvm, ExitHandlers()) as m:
        region = m.add_memory(EXITS_TEST_GPA, EXITS_TEST_SIZE, Backing.SHARED, slot=EXITS_TEST_SLOT)
        assert region.flags == 0 and region.gmem is None
        m.load(load_guest("private_mem_kvm_exits"), arg=EXITS_TEST_GPA)
        m.vm.set_memory_attributes(EXITS_TEST_GPA, EXITS_TEST_SIZE, KVM_MEMORY_ATTRIBUTE_PRIVATE)
        expect_private_fault(m.vcpus[0], *enter_once(m.vcpus[0]))


@pytest.mark.beyond_kernel
def test_memslot_not_private_is_a_clear_error(private_kvm: Kvm) -> None:
    """Beyond the kernel test (its second case, under vmm's production handlers): the private
    fault on a slot without guest_memfd cannot be resolved, so PrivateMemoryHandlers raise
    MemoryFaultError after a bounded number of exits, and its message names the fault (flags, gpa,
    size) and the attribute map there; the guest never gets past its first read."""
    with protected_machine(private_kvm, None) as m:
        handlers, conv = m.handlers, m.converter
        assert isinstance(handlers, PrivateMemoryHandlers) and conv is not None
        m.add_memory(EXITS_TEST_GPA, EXITS_TEST_SIZE, Backing.SHARED, slot=EXITS_TEST_SLOT)
        m.load(load_guest("private_mem_kvm_exits"), arg=EXITS_TEST_GPA)
        # vm_mem_set_private() as the kernel test does it: KVM's attributes only. vmm's converter
        # refuses the same request because the slot has no guest_memfd.
        m.vm.set_memory_attributes(EXITS_TEST_GPA, EXITS_TEST_SIZE, KVM_MEMORY_ATTRIBUTE_PRIVATE)
        with pytest.raises(MemoryFaultError) as e:
            m.run(timeout=TIMEOUT)
        message = str(e.value)
        fault = (
            f"KVM_EXIT_MEMORY_FAULT private flags={KVM_MEMORY_EXIT_FLAG_PRIVATE:#x} "
            f"gpa={EXITS_TEST_GPA:#x} size={EXITS_TEST_SIZE:#x}"
        )
        assert fault in message, message
        assert "map: [" in message and "shared" in message.split("map: ")[1], message
        assert 1 <= handlers.counts.memory_faults <= MAX_REPEATS, handlers.counts
        assert m.runners[0].exit_counts[ExitReason.MEMORY_FAULT] == handlers.counts.memory_faults
        assert conv.stats.conversions == 0
