"""The private-memory cases of tools/testing/selftests/kvm/set_memory_region_test.c (6.12):
test_add_private_memory_region() and test_add_overlapping_private_memory_regions(), always on the
VM the kernel uses for them, KVM_X86_SW_PROTECTED_VM (vm_create_barebones_type()).

selftests/test_set_memory_region.py runs the same two binding checks on whichever VM takes
guest_memfd slots (a default VM on 6.18). This file adds what needs private memory: the binding
that is finally accepted really serves private accesses, and dies with the guest_memfd's fd (the
kernel test closes its fd right after binding: kvm_gmem_bind() keeps no reference, "the file pins
KVM, not the other way 'round"); and the guest_memfd-range overlap the kernel test's comment
describes (its calls also overlap in GPA, so the EEXIST it sees comes from the memslot check; a
binding that overlaps only inside the guest_memfd is refused by kvm_gmem_bind() with EINVAL)."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable

import pytest

from vmm import guest, uapi
from vmm.exits import MemoryFaultExit
from vmm.machine import Machine
from vmm.memory import PAGE_SIZE, Backing
from vmm.runner import ExitHandlers
from vmm.system import Kvm
from vmm.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEMORY_EXIT_FLAG_PRIVATE, MemFlag, VmType
from vmm.ucall import Ucall, UcallCmd
from vmm.vm import Vm

pytestmark = pytest.mark.private_mem

MEM_REGION_SIZE = 0x200000
MEM_REGION_GPA = 0xC0000000
MEM_REGION_SLOT = 10
NO_GUEST_MEMFD = 0xFFFFFFFF  # the kernel's guest_memfd = -1 when deleting a slot
TIMEOUT = 60.0


def expect_errno(err: int, call: Callable[[], object], why: str) -> None:
    """``call`` fails with ``err`` (TEST_ASSERT(r == -1 && errno == err, msg))."""
    with pytest.raises(OSError) as e:
        call()
    assert e.value.errno == err, f"{why}: expected {errno.errorcode[err]}, got {e.value}"


def bind(vm: Vm, fd: int, offset: int = 0, slot: int = MEM_REGION_SLOT, gpa: int = MEM_REGION_GPA,
         size: int = MEM_REGION_SIZE) -> None:
    """vm_set_user_memory_region2(vm, slot, KVM_MEM_GUEST_MEMFD, gpa, size, 0, fd, offset)."""
    vm.set_user_memory_region2(slot, MemFlag.GUEST_MEMFD, gpa, size, 0, fd, offset)


def delete(vm: Vm, slot: int, gpa: int) -> None:
    """vm_set_user_memory_region2(vm, slot, KVM_MEM_GUEST_MEMFD, gpa, 0, NULL, -1, 0)."""
    vm.set_user_memory_region2(slot, MemFlag.GUEST_MEMFD, gpa, 0, 0, NO_GUEST_MEMFD, 0)


def test_add_private_memory_region(private_kvm: Kvm) -> None:
    """set_memory_region_test.c: test_add_private_memory_region(), on a SW_PROTECTED VM. Binding
    slot 10 to /dev/kvm's fd, the VM's fd, a plain memfd, or another SW_PROTECTED VM's
    guest_memfd is EINVAL (that VM binds it fine); so is every unaligned offset 1..4095; offset 0
    binds. Beyond the kernel test: the slot's pages turned private are read by a vCPU through that
    binding (a fresh private page reads zeros, not the shared side); once the guest_memfd's fd is
    closed (the kernel test's close(memfd)), the binding is gone: the next private access exits
    KVM_EXIT_MEMORY_FAULT (EFAULT, flags PRIVATE, that page)."""
    with Machine(kvm=private_kvm, vm_type=VmType.SW_PROTECTED, handlers=ExitHandlers()) as m:
        vm = m.vm
        expect_errno(errno.EINVAL, lambda: bind(vm, private_kvm.fd), "KVM fd should fail")
        expect_errno(errno.EINVAL, lambda: bind(vm, vm.fd), "VM's fd should fail")
        memfd = os.memfd_create("not-guest-memfd", os.MFD_CLOEXEC)
        try:
            os.ftruncate(memfd, MEM_REGION_SIZE)
            expect_errno(errno.EINVAL, lambda: bind(vm, memfd), "Regular memfd() should fail")
        finally:
            os.close(memfd)
        with private_kvm.create_vm(VmType.SW_PROTECTED) as vm2:
            other = vm2.create_guest_memfd(MEM_REGION_SIZE)
            expect_errno(errno.EINVAL, lambda: bind(vm, other.fd), "Other VM's guest_memfd() should fail")
            bind(vm2, other.fd)
            other.close()

        gmem = vm.create_guest_memfd(MEM_REGION_SIZE)
        for offset in range(1, PAGE_SIZE):
            expect_errno(errno.EINVAL, lambda: bind(vm, gmem.fd, offset), f"Unaligned offset {offset} should fail")
        # the kernel's final vm_set_user_memory_region2(..., memfd, 0), with a shared backing beside it
        region = m.add_memory(MEM_REGION_GPA, MEM_REGION_SIZE, Backing.GUEST_MEMFD, slot=MEM_REGION_SLOT, gmem=gmem)
        assert region.flags & MemFlag.GUEST_MEMFD and region.gmem is gmem

        page = MEM_REGION_GPA + MEM_REGION_SIZE - PAGE_SIZE
        m.load(guest.load("private_mem_kvm_exits"), arg=page)
        m.vm.set_memory_attributes(MEM_REGION_GPA, MEM_REGION_SIZE, KVM_MEMORY_ATTRIBUTE_PRIVATE)
        m.memory.write(page, b"\xff" * 8)  # the shared side, which a private read must not see
        uc = m.run(timeout=TIMEOUT)
        assert isinstance(uc, Ucall) and uc.cmd == UcallCmd.SYNC and uc.stage == 1, f"got {uc}"
        assert uc.args[1] == 0, f"private read of {page:#x} through the bound guest_memfd gave {uc.args[1]:#x}"

        gmem.close()  # kvm_gmem_release(): the binding's file pointer is cleared, its SPTEs zapped
        vcpu = m.vcpus[0]
        with pytest.raises(OSError) as e:
            fcntl.ioctl(vcpu.fd, uapi.KVM_RUN, 0)  # the guest keeps reading the page
        fault = vcpu.exit()
        assert e.value.errno == errno.EFAULT and isinstance(fault, MemoryFaultExit), f"{e.value}, {fault}"
        assert (fault.flags, fault.gpa, fault.size) == (KVM_MEMORY_EXIT_FLAG_PRIVATE, page, PAGE_SIZE), str(fault)


def test_add_overlapping_private_memory_regions(private_kvm: Kvm) -> None:
    """set_memory_region_test.c: test_add_overlapping_private_memory_regions(), on a SW_PROTECTED
    VM. One 8M guest_memfd: slot 10 at 3G binds [0, 4M), slot 11 at 6G binds [4M, 8M); slot 10
    deleted, re-adding it over the front or the back half of slot 11's GPAs is EEXIST. Beyond the
    kernel test: GPAs that overlap nothing but a guest_memfd range already bound to slot 11 (whole,
    front half, back half, one page) are EINVAL; the range slot 10 gave up can be bound again, and
    after slot 11 is deleted so can its range."""
    with private_kvm.create_vm(VmType.SW_PROTECTED) as vm, vm.create_guest_memfd(MEM_REGION_SIZE * 4) as gmem:
        bind(vm, gmem.fd, 0, MEM_REGION_SLOT, MEM_REGION_GPA, MEM_REGION_SIZE * 2)
        bind(vm, gmem.fd, MEM_REGION_SIZE * 2, MEM_REGION_SLOT + 1, MEM_REGION_GPA * 2, MEM_REGION_SIZE * 2)
        delete(vm, MEM_REGION_SLOT, MEM_REGION_GPA)
        for half, gpa in (("front", MEM_REGION_GPA * 2 - MEM_REGION_SIZE), ("back", MEM_REGION_GPA * 2 + MEM_REGION_SIZE)):
            expect_errno(errno.EEXIST, lambda: bind(vm, gmem.fd, 0, MEM_REGION_SLOT, gpa, MEM_REGION_SIZE * 2),
                         f"Overlapping guest_memfd() bindings should fail with EEXIST ({half} half)")

        free_gpa = MEM_REGION_GPA * 4  # overlaps no memslot
        for what, offset, size in (("all of", MEM_REGION_SIZE * 2, MEM_REGION_SIZE * 2),
                                   ("the front half of", MEM_REGION_SIZE, MEM_REGION_SIZE * 2),
                                   ("the back half of", MEM_REGION_SIZE * 3, MEM_REGION_SIZE),
                                   ("one page of", MEM_REGION_SIZE * 4 - PAGE_SIZE, PAGE_SIZE)):
            expect_errno(errno.EINVAL, lambda: bind(vm, gmem.fd, offset, MEM_REGION_SLOT, free_gpa, size),
                         f"a binding of {what} slot 11's guest_memfd range")
        bind(vm, gmem.fd, 0, MEM_REGION_SLOT, free_gpa, MEM_REGION_SIZE * 2)  # what slot 10 gave up
        delete(vm, MEM_REGION_SLOT + 1, MEM_REGION_GPA * 2)
        bind(vm, gmem.fd, MEM_REGION_SIZE * 2, MEM_REGION_SLOT + 1, free_gpa + MEM_REGION_SIZE * 2, MEM_REGION_SIZE * 2)
