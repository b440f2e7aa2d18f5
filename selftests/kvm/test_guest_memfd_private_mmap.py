"""Private memory x mmap-able guest_memfd: what a VM with private memory (KVM_X86_SW_PROTECTED_VM)
does with GUEST_MEMFD_FLAG_MMAP. Beyond the kernel's guest_memfd_test.c, which only checks that a
fresh MMAP guest_memfd without INIT_SHARED faults with SIGBUS.

What 7.3's virt/kvm/guest_memfd.c does, and these tests check: such a VM's
KVM_CAP_GUEST_MEMFD_FLAGS offers MMAP but not INIT_SHARED (kvm_arch_supports_gmem_init_shared() is
false for VMs with private memory), and creating with INIT_SHARED is EINVAL. Whether the host may
touch a page through the mapping depends on the guest_memfd's own INIT_SHARED flag only
(kvm_gmem_fault_user_mapping()), not on the VM's memory attributes: every page of a MMAP-only
guest_memfd faults with SIGBUS, whether its attribute is private or shared, before and after
conversions, allocated or punched. Conversions and PUNCH_HOLE work while the range is mapped.
The accesses that must fault run in a forked child, so the SIGBUS kills the child, not pytest.

All gated on capabilities: KVM_X86_SW_PROTECTED_VM in KVM_CAP_VM_TYPES, GUEST_MEMFD_FLAG_MMAP in
that VM's KVM_CAP_GUEST_MEMFD_FLAGS, KVM_MEMORY_ATTRIBUTE_PRIVATE in its KVM_CAP_MEMORY_ATTRIBUTES.
"""

from __future__ import annotations

import ctypes
import errno
import faulthandler
import mmap
import os
import signal
from collections.abc import Iterator

import pytest

from vmm import Cap, GmemFlag, GuestMemfd, Kvm, MemFlag, Vm, VmType
from vmm.kvm import syscalls
from vmm.tools.pytest_plugin import require, require_gmem_flags, require_private_mem

from helpers import expect_errno

pytestmark = [pytest.mark.beyond_kernel, pytest.mark.private_mem]

PAGE_SIZE = syscalls.HOST_PAGE_SIZE
PAGES = 4
TOTAL_SIZE = PAGES * PAGE_SIZE
MMAP, INIT_SHARED = int(GmemFlag.MMAP), int(GmemFlag.INIT_SHARED)
PRIVATE = 1 << 3  # KVM_MEMORY_ATTRIBUTE_PRIVATE
GPA = 0x10_0000  # where the test memslot puts the guest_memfd (no vCPU ever runs)
SLOT = 1


@pytest.fixture
def private_vm(kvm: Kvm) -> Iterator[Vm]:
    """A KVM_X86_SW_PROTECTED_VM whose guest_memfds may be mapped and whose memory can be private."""
    require_private_mem(kvm)
    with kvm.create_vm(VmType.SW_PROTECTED) as vm:
        require_gmem_flags(vm, MMAP)
        require(vm.supported_memory_attributes() & PRIVATE != 0, "KVM_MEMORY_ATTRIBUTE_PRIVATE on this VM")
        yield vm


@pytest.fixture
def bound(private_vm: Vm) -> Iterator[GuestMemfd]:
    """A MMAP-only guest_memfd of TOTAL_SIZE, allocated, bound to memslot SLOT at GPA (with an
    anonymous shared backing as userspace_addr, which the slot never uses: binding a MMAP
    guest_memfd makes it guest_memfd-only) and mapped MAP_SHARED in this process."""
    with (
        private_vm.create_guest_memfd(TOTAL_SIZE, MMAP) as gmem,
        syscalls.raw_mapping(
            TOTAL_SIZE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS
        ) as shared,
    ):
        gmem.allocate(0, TOTAL_SIZE)
        private_vm.set_user_memory_region2(SLOT, MemFlag.GUEST_MEMFD, GPA, TOTAL_SIZE, shared, gmem.fd, 0)
        gmem.mmap()  # mapping made; nothing faulted in
        try:
            yield gmem
        finally:
            private_vm.set_user_memory_region2(SLOT, MemFlag.GUEST_MEMFD, GPA, 0, shared, gmem.fd, 0)


def host_access(gmem: GuestMemfd, offset: int, write: bool) -> str:
    """Touch one byte at ``offset`` through this process's mapping of ``gmem``, in a forked child
    (which shares the mapping). Returns "SIGBUS", or "read 0x.." / "wrote" when the access
    worked, or how else the child ended."""
    return host_access_at(syscalls.address_of(gmem.mmap()) + offset, write)


def host_access_at(addr: int, write: bool) -> str:
    """host_access() at a plain address."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no Python after the fault, so no traceback and no pytest teardown
        try:
            os.close(rfd)
            faulthandler.disable()
            signal.signal(signal.SIGBUS, signal.SIG_DFL)
            if write:
                ctypes.memset(addr, 0x5A, 1)
                os.write(wfd, b"wrote")
            else:
                os.write(wfd, f"read {ctypes.string_at(addr, 1)[0]:#04x}".encode())
        finally:
            os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        said = r.read().decode()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return signal.Signals(os.WTERMSIG(status)).name
    return said or f"exit status {os.WEXITSTATUS(status)}"


def expect_sigbus_everywhere(gmem: GuestMemfd, state: str) -> None:
    """Every page, read and written, faults with SIGBUS."""
    for page in range(PAGES):
        for write in (False, True):
            got = host_access(gmem, page * PAGE_SIZE, write)
            what = "write" if write else "read"
            assert got == "SIGBUS", f"host {what} of page {page} ({state}): expected SIGBUS, got {got}"


def test_private_vm_gmem_flags(private_vm: Vm) -> None:
    """KVM_CAP_GUEST_MEMFD_FLAGS of a VM with private memory offers MMAP without INIT_SHARED
    (7.3: kvm_arch_supports_gmem_init_shared() is false when the VM has private memory), and
    KVM_CREATE_GUEST_MEMFD refuses INIT_SHARED, alone or with MMAP, with EINVAL; MMAP alone works,
    and so does mapping it (MAP_SHARED; MAP_PRIVATE is EINVAL as on any guest_memfd)."""
    offered = private_vm.check_extension(Cap.GUEST_MEMFD_FLAGS)
    assert offered & MMAP
    require(
        not offered & INIT_SHARED,
        f"a VM type with private memory whose KVM_CAP_GUEST_MEMFD_FLAGS lacks INIT_SHARED (it offers {offered:#x})",
    )
    for flags in (INIT_SHARED, MMAP | INIT_SHARED):
        expect_errno(errno.EINVAL, lambda: private_vm.create_guest_memfd(TOTAL_SIZE, flags), f"flags {flags:#x}")
    with private_vm.create_guest_memfd(TOTAL_SIZE, MMAP) as gmem:
        gmem.mmap()
        expect_errno(
            errno.EINVAL,
            lambda: mmap.mmap(gmem.fd, TOTAL_SIZE, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE),
            "MAP_PRIVATE",
        )


def test_host_access_private_page(private_vm: Vm, bound: GuestMemfd) -> None:
    """A page whose attribute is private, allocated in the guest_memfd: a host read or write
    through the mapping dies of SIGBUS (it does not read zeros or the guest's data). Control: the
    same child access on an ordinary shared mapping reads and writes."""
    with mmap.mmap(-1, PAGE_SIZE, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS) as control:
        control[0] = 0x5A
        addr = syscalls.address_of(control)
        assert host_access_at(addr, False) == "read 0x5a"
        assert host_access_at(addr, True) == "wrote"
    private_vm.set_memory_attributes(GPA, TOTAL_SIZE, PRIVATE)
    expect_sigbus_everywhere(bound, "attribute private")


def test_host_access_shared_page(private_vm: Vm, bound: GuestMemfd) -> None:
    """A page whose attribute is shared (the default, and again after a private -> shared
    conversion) is still SIGBUS through the mapping: the host's view follows the guest_memfd's
    INIT_SHARED flag, which a VM with private memory cannot set, not the VM's attributes
    (in-place conversion through the guest_memfd is not merged in 7.3)."""
    expect_sigbus_everywhere(bound, "attribute shared, never converted")
    private_vm.set_memory_attributes(GPA, TOTAL_SIZE, PRIVATE)
    private_vm.set_memory_attributes(GPA, TOTAL_SIZE, 0)
    expect_sigbus_everywhere(bound, "converted private -> shared")


def test_conversion_while_mapped(private_vm: Vm, bound: GuestMemfd) -> None:
    """Converting a range back and forth while it is mapped (and after a faulting access through
    the mapping) succeeds; page by page and for a part of the range too; the mapping stays usable
    afterwards (still SIGBUS, the process is fine, munmap works)."""
    assert host_access(bound, 0, False) == "SIGBUS"
    for _ in range(3):
        private_vm.set_memory_attributes(GPA, TOTAL_SIZE, PRIVATE)
        private_vm.set_memory_attributes(GPA, TOTAL_SIZE, 0)
    for page in range(PAGES):
        private_vm.set_memory_attributes(GPA + page * PAGE_SIZE, PAGE_SIZE, PRIVATE)
    private_vm.set_memory_attributes(GPA + PAGE_SIZE, 2 * PAGE_SIZE, 0)
    expect_sigbus_everywhere(bound, "mixed private and shared after conversions while mapped")
    assert bound.map is not None
    bound.map.close()
    bound.map = None


@pytest.mark.parametrize("attribute", [PRIVATE, 0], ids=["private", "shared"])
def test_punch_hole_mapped(private_vm: Vm, bound: GuestMemfd, attribute: int) -> None:
    """PUNCH_HOLE of a mapped range (all of it, then one page) succeeds whatever its attribute;
    the punched pages still fault with SIGBUS (a hole does not become readable zeros), and can be
    allocated again."""
    private_vm.set_memory_attributes(GPA, TOTAL_SIZE, attribute)
    bound.punch_hole(0, TOTAL_SIZE)
    state = f"attribute {'private' if attribute else 'shared'}, punched"
    expect_sigbus_everywhere(bound, state)
    bound.allocate(0, TOTAL_SIZE)
    bound.punch_hole(PAGE_SIZE, PAGE_SIZE)
    expect_sigbus_everywhere(bound, state + " and allocated again, one page punched")
