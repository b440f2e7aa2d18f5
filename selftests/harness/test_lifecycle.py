"""Object lifecycle and error reporting: VMs with memory and a vCPU are created and destroyed
without leaking fds or mappings, ``with`` closes every object at once, failed calls raise a
KvmError that says what failed and how, capabilities are asked where they mean something (the
VM fd), allocated-memory accounting follows writes, fallocate and hole punching, and the binding
guards its calls (struct sizes, closed fds, raw KVM_RUN, EIO from a VM that is not ours to use)."""

from __future__ import annotations

import errno
import mmap
import os
import select
import time
from collections.abc import Callable

import pytest

from vmm import PAGE_SIZE, Cap, GmemFlag, GuestMemfd, GuestMemory, Kvm, KvmError, Machine, MemFlag, Vm, VmType
from vmm.kvm.syscalls import address_of, meminfo
from vmm.kvm.uapi import (
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_SET_MEMORY_ATTRIBUTES,
    KVM_SET_NR_MMU_PAGES,
    KVM_SET_USER_MEMORY_REGION,
    KVM_SET_USER_MEMORY_REGION2,
    ExitReason,
    kvm_memory_attributes,
    kvm_userspace_memory_region2,
)
from vmm.tools.pytest_plugin import require, require_gmem_flags, require_private_mem

from helpers import mapping_count, no_gc, open_fds

VM_CYCLES = 1000
REGION_SIZE = 16 * PAGE_SIZE
SHARED_GPA, GMEM_GPA = 0, 1 << 20
MMAP_SHARED_FLAGS = int(GmemFlag.MMAP | GmemFlag.INIT_SHARED)


def gmem_vm_type(kvm: Kvm) -> VmType:
    """A VM type whose VM fd reports KVM_CAP_GUEST_MEMFD (so it takes guest_memfd slots)."""
    with kvm.create_vm() as vm:
        if vm.check_extension(Cap.GUEST_MEMFD):
            return VmType.DEFAULT
    require_private_mem(kvm)
    return VmType.SW_PROTECTED


def gmem_backing(vm: Vm) -> tuple[str, int]:
    """A guest_memfd region's backing: guest_memfd-only (mmap'd, so it maps too) when the VM
    offers MMAP|INIT_SHARED, else memfd + guest_memfd."""
    if vm.check_extension(Cap.GUEST_MEMFD_FLAGS) & MMAP_SHARED_FLAGS == MMAP_SHARED_FLAGS:
        return "guest_memfd-only", MMAP_SHARED_FLAGS
    return "guest_memfd", 0


# --- (a) create and destroy 1,000 VMs ----------------------------------------------------------


def test_vm_create_destroy_leaks_nothing(kvm: Kvm, record_property: Callable[[str, object], None]) -> None:
    """1,000 VMs, each with a shared region, a guest_memfd region and a vCPU, created and closed
    one after another: the process ends with the same open fds and the same number of mappings."""
    vm_type = gmem_vm_type(kvm)

    def cycle() -> None:
        with kvm.create_vm(vm_type) as vm:
            memory = GuestMemory(vm)
            try:
                memory.add(SHARED_GPA, REGION_SIZE, "shared")
                backing, flags = gmem_backing(vm)
                memory.add(GMEM_GPA, REGION_SIZE, backing, gmem_flags=flags)
                with vm.create_vcpu(0):
                    pass
            finally:
                memory.close()

    cycle()  # warm up: lazy imports, cached sizes, allocator arenas
    with no_gc():
        fds, maps = open_fds(), mapping_count()
        start = time.perf_counter()
        for _ in range(VM_CYCLES):
            cycle()
        elapsed = time.perf_counter() - start
        assert open_fds() == fds, "fds leaked"
        assert mapping_count() == maps, "mappings leaked"
    record_property("seconds", round(elapsed, 3))
    print(f"{VM_CYCLES} VMs with memory and a vCPU in {elapsed:.2f} s ({elapsed / VM_CYCLES * 1e3:.2f} ms each)")


# --- (b) with closes everything ----------------------------------------------------------------


def test_with_closes_each_object() -> None:
    """/dev/kvm, a VM, a vCPU and a guest_memfd each close at the end of their ``with`` block: the
    fd (and the kvm_run / guest_memfd mapping) is gone right then, without the garbage collector."""
    with no_gc():
        before_all = (open_fds(), mapping_count())
        with Kvm() as kvm:
            with kvm.create_vm() as vm:
                before = (open_fds(), mapping_count())
                with vm.create_vcpu(0) as vcpu:
                    assert mapping_count() > before[1], "kvm_run is not mapped"
                assert vcpu.closed and (open_fds(), mapping_count()) == before
                mappable = vm.check_extension(Cap.GUEST_MEMFD_FLAGS) & GmemFlag.MMAP
                with vm.create_guest_memfd(REGION_SIZE, GmemFlag.MMAP if mappable else 0) as gmem:
                    if mappable:
                        gmem.mmap()
                assert gmem.closed and gmem.map is None and (open_fds(), mapping_count()) == before
            assert vm.closed
        assert kvm.closed and (open_fds(), mapping_count()) == before_all


def test_with_closes_machine(kvm: Kvm) -> None:
    """A Machine closes its vCPUs, memory backings and VM when its ``with`` block ends."""
    with no_gc():
        before = (open_fds(), mapping_count())
        with Machine(kvm=kvm, vcpus=2) as m:
            backing, flags = gmem_backing(m.vm) if m.vm.check_extension(Cap.GUEST_MEMFD) else ("shared", 0)
            m.add_memory(GMEM_GPA * 8, REGION_SIZE, backing, gmem_flags=flags)
            assert len(open_fds()) > len(before[0])
        assert all(v.closed for v in m.vcpus) and m.vm.closed and not m.memory.regions
        assert (open_fds(), mapping_count()) == before


# --- (c) errors say what failed ----------------------------------------------------------------


ERROR_CASES = {
    # case: (the call's name in the error, pieces its message must contain)
    "memslot2_bad_flags": (
        "KVM_SET_USER_MEMORY_REGION2",
        ["slot=3", "flags=0x80", "guest_phys_addr=0x100000", "memory_size=0x2000", "on VM fd"],
    ),
    "guest_memfd_bad_size": ("KVM_CREATE_GUEST_MEMFD", ["size=1", "flags=0", "on VM fd"]),
    "bad_vm_type": ("KVM_CREATE_VM", ["KVM_CREATE_VM(127)", "on /dev/kvm fd"]),
    "unaligned_punch_hole": ("fallocate", ["KEEP_SIZE|PUNCH_HOLE", "offset=0x1", "len=0x1000", "on guest_memfd fd"]),
}


def failing_call(case: str, kvm: Kvm, vm: Vm, gmem: GuestMemfd) -> Callable[[], object]:
    return {
        "memslot2_bad_flags": lambda: vm.set_user_memory_region2(3, 0x80, 0x100000, 0x2000, 0),
        "guest_memfd_bad_size": lambda: vm.create_guest_memfd(1),
        "bad_vm_type": lambda: kvm.create_vm(0x7F),
        "unaligned_punch_hole": lambda: gmem.punch_hole(1, PAGE_SIZE),
    }[case]


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_error_names_call_errno_and_arguments(kvm: Kvm, vm: Vm, case: str) -> None:
    """A failed call raises KvmError (an OSError with .errno and .call) whose message names the
    ioctl or syscall, the fd kind, the errno name and number, and the decoded arguments (struct
    fields by name, padding left out)."""
    name, pieces = ERROR_CASES[case]
    with vm.create_guest_memfd(PAGE_SIZE) as gmem, pytest.raises(KvmError) as e:
        failing_call(case, kvm, vm, gmem)()
    err = e.value
    assert isinstance(err, OSError) and err.errno == errno.EINVAL and err.call == name
    message = str(err)
    missing = [p for p in [name, "EINVAL (22)", *pieces] if p not in message]
    assert not missing, f"{message!r} lacks {missing}"
    assert "pad" not in message and "reserved" not in message


# --- (d) capabilities: the VM fd vs /dev/kvm ---------------------------------------------------


def test_capabilities_on_vm_fd_vs_dev_kvm(kvm: Kvm) -> None:
    """VM-independent capabilities (NR_MEMSLOTS, USER_MEMORY2) read the same on /dev/kvm and on a
    VM fd; GUEST_MEMFD on the VM fd is what decides whether that VM takes KVM_MEM_GUEST_MEMFD
    slots (on 6.12 a default VM says 0 although /dev/kvm says 1); with GUEST_MEMFD_FLAG_MMAP
    (6.18) every VM has guest_memfd, so a default VM's fd says nonzero."""
    require(kvm.check_extension(Cap.GUEST_MEMFD) > 0, "KVM_CAP_GUEST_MEMFD")
    for vm_type in sorted(kvm.vm_types()):
        with kvm.create_vm(vm_type) as vm:
            for cap in (Cap.NR_MEMSLOTS, Cap.USER_MEMORY2):
                assert vm.check_extension(cap) == kvm.check_extension(cap), f"{cap.name} on VM type {vm_type}"
            has_gmem = vm.check_extension(Cap.GUEST_MEMFD) > 0
            with vm.create_guest_memfd(PAGE_SIZE) as gmem:
                try:
                    vm.set_user_memory_region2(0, MemFlag.GUEST_MEMFD, 0, PAGE_SIZE, 0, gmem.fd, 0)
                    bound = True
                except OSError as e:
                    assert e.errno == errno.EINVAL, e
                    bound = False
            assert bound == has_gmem, (
                f"VM type {vm_type}: KVM_CAP_GUEST_MEMFD={has_gmem} but binding {'worked' if bound else 'failed'}"
            )
            if vm_type == VmType.DEFAULT and vm.check_extension(Cap.GUEST_MEMFD_FLAGS) & GmemFlag.MMAP:
                assert has_gmem, "a default VM with GUEST_MEMFD_FLAG_MMAP must report KVM_CAP_GUEST_MEMFD"


def test_memory_attributes_follow_vm_fd_capability(kvm: Kvm) -> None:
    """KVM_CAP_MEMORY_ATTRIBUTES on the VM fd predicts KVM_SET_MEMORY_ATTRIBUTES (the raw ioctl,
    since Vm.set_memory_attributes asks the capability itself): without KVM_MEMORY_ATTRIBUTE_PRIVATE
    there, making a range private fails (ENOTTY when the ioctl is compiled out, EINVAL when the VM
    type lacks it); with it, it works."""
    for vm_type in sorted(kvm.vm_types()):
        with kvm.create_vm(vm_type) as vm:
            private = vm.check_extension(Cap.MEMORY_ATTRIBUTES) & KVM_MEMORY_ATTRIBUTE_PRIVATE
            req = kvm_memory_attributes(address=0, size=PAGE_SIZE, attributes=KVM_MEMORY_ATTRIBUTE_PRIVATE)
            if private:
                vm.ioctl(KVM_SET_MEMORY_ATTRIBUTES, req)
            else:
                with pytest.raises(OSError) as e:
                    vm.ioctl(KVM_SET_MEMORY_ATTRIBUTES, req)
                assert e.value.errno in (errno.ENOTTY, errno.EINVAL), e.value


def test_set_memory_attributes_refuses_unsupported_bits(kvm: Kvm, vm: Vm) -> None:
    """An attribute bit the VM's KVM_CAP_MEMORY_ATTRIBUTES lacks is refused before the ioctl, with
    EINVAL (KVM's own answer where the ioctl exists) and a note naming the bits and the capability;
    the raw ioctl also refuses it (measured on the kvm_pvm host: ENOTTY, the ioctl is compiled out;
    a 6.12 default VM says EINVAL)."""
    supported = vm.check_extension(Cap.MEMORY_ATTRIBUTES)
    bit = next(1 << b for b in range(64) if not supported & (1 << b))
    with pytest.raises(KvmError) as refused:
        vm.set_memory_attributes(0, PAGE_SIZE, bit)
    assert refused.value.errno == errno.EINVAL and refused.value.call == "KVM_SET_MEMORY_ATTRIBUTES"
    message = str(refused.value)
    assert f"attribute bits {bit:#x}" in message and f"KVM_CAP_MEMORY_ATTRIBUTES ({supported:#x})" in message
    assert "not issued" in message, message
    with pytest.raises(KvmError) as raw:
        vm.ioctl(KVM_SET_MEMORY_ATTRIBUTES, kvm_memory_attributes(address=0, size=PAGE_SIZE, attributes=bit))
    assert raw.value.errno in (errno.ENOTTY, errno.EINVAL) and "not issued" not in str(raw.value), raw.value


# --- (e) allocated bytes -----------------------------------------------------------------------


def test_shared_allocated_bytes(vm: Vm) -> None:
    """A shared region's shared_allocated() (memfd st_blocks) is 0 when fresh, grows by at least
    what the host wrote, and drops back to 0 after punch_hole_shared."""
    memory = GuestMemory(vm)
    try:
        region = memory.add(SHARED_GPA, REGION_SIZE, "shared")
        assert region.shared_allocated() == 0
        memory.write(SHARED_GPA + PAGE_SIZE, b"\x5a" * 4 * PAGE_SIZE)
        assert 4 * PAGE_SIZE <= region.shared_allocated() <= REGION_SIZE
        region.punch_hole_shared(0, REGION_SIZE)
        assert region.shared_allocated() == 0
        assert memory.read(SHARED_GPA + PAGE_SIZE, 8) == bytes(8), "a discarded page must read back as zeros"
    finally:
        memory.close()


def test_guest_memfd_allocated_bytes(vm: Vm) -> None:
    """With GUEST_MEMFD_FLAG_MMAP, a guest_memfd-only region's private_allocated() and its
    guest_memfd's allocated_bytes() (mincore on the mapping) start at 0, count exactly the pages
    written through the mapping, and drop after punch_hole. (mincore counts up-to-date pages, so
    pages fallocate allocated but nobody touched yet do not show: see the next test.)"""
    require_gmem_flags(vm, MMAP_SHARED_FLAGS)
    memory = GuestMemory(vm)
    try:
        region = memory.add(GMEM_GPA, REGION_SIZE, "guest_memfd-only", gmem_flags=MMAP_SHARED_FLAGS)
        assert region.private_allocated() == region.gmem.allocated_bytes() == 0
        memory.write(GMEM_GPA + 2 * PAGE_SIZE, b"\xa5" * 3 * PAGE_SIZE)
        assert region.private_allocated() == region.gmem.allocated_bytes() == 3 * PAGE_SIZE
        region.punch_hole_private(2 * PAGE_SIZE, PAGE_SIZE)
        assert region.private_allocated() == 2 * PAGE_SIZE
        region.punch_hole_private(0, REGION_SIZE)
        assert region.private_allocated() == region.gmem.allocated_bytes() == 0
    finally:
        memory.close()


def test_guest_memfd_fallocate_allocates(vm: Vm) -> None:
    """fallocate on a guest_memfd allocates its pages and PUNCH_HOLE frees them, seen through
    /proc/meminfo Unevictable (system-wide, so 64 MiB moves are compared with a 16 MiB margin);
    touching the allocated pages through the mapping then makes mincore count them."""
    require_gmem_flags(vm, MMAP_SHARED_FLAGS)
    size, margin = 64 << 20, 16 << 20
    with vm.create_guest_memfd(size, MMAP_SHARED_FLAGS) as gmem:
        mem = gmem.mmap()
        before = meminfo("Unevictable")
        gmem.allocate(0, size)
        allocated = meminfo("Unevictable")
        assert abs(allocated - before - size) <= margin, f"Unevictable grew by {(allocated - before) >> 20} MiB"
        assert sum(mem[i] for i in range(0, 4 * PAGE_SIZE, PAGE_SIZE)) == 0  # read 4 allocated pages
        assert gmem.allocated_bytes() == 4 * PAGE_SIZE
        gmem.punch_hole(0, size)
        freed = meminfo("Unevictable")
        assert abs(allocated - freed - size) <= margin, f"Unevictable dropped by {(allocated - freed) >> 20} MiB"
        assert gmem.allocated_bytes() == 0


# --- (f) the binding's guards: struct sizes, closed fds, raw KVM_RUN, dead VMs -------------------


def test_wrong_struct_size_is_refused_before_the_kernel(vm: Vm) -> None:
    """A struct whose size differs from the one encoded in the ioctl number raises TypeError naming
    the ioctl, the struct and both sizes, and the kernel never sees it: a 160-byte memslot2 struct
    on the 32-byte KVM_SET_USER_MEMORY_REGION would have added slot 0 at GPA 0 (its first 32 bytes
    are a valid v1 region), yet another slot can still take GPA 0 afterwards."""
    with pytest.raises(TypeError) as e:
        vm.ioctl(KVM_SET_USER_MEMORY_REGION2, kvm_memory_attributes(address=0, size=PAGE_SIZE))
    message = str(e.value)
    assert all(p in message for p in ("KVM_SET_USER_MEMORY_REGION2", "kvm_memory_attributes", "160", "32")), message
    backing = mmap.mmap(-1, PAGE_SIZE)
    addr = address_of(backing)
    v2 = kvm_userspace_memory_region2(slot=0, guest_phys_addr=0, memory_size=PAGE_SIZE, userspace_addr=addr)
    with pytest.raises(TypeError, match="KVM_SET_USER_MEMORY_REGION takes a 32-byte struct"):
        vm.ioctl(KVM_SET_USER_MEMORY_REGION, v2)
    vm.set_user_memory_region(1, 0, 0, PAGE_SIZE, addr)  # EEXIST after a raw fcntl.ioctl of v2 (measured)
    vm.set_user_memory_region(1, 0, 0, 0, addr)  # deleted before its backing goes
    backing.close()


def test_closed_fds_name_the_call() -> None:
    """Every object's close() is idempotent; afterwards an ioctl raises ValueError naming the ioctl
    and the fd kind (fcntl alone says "file descriptor cannot be a negative integer"), and so do
    KVM_RUN through run() and run_raw() and fileno()."""
    kvm = Kvm()
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    gmem = vm.create_guest_memfd(PAGE_SIZE) if vm.check_extension(Cap.GUEST_MEMFD) else None
    for obj in (vcpu, gmem, vm, kvm):
        if obj is not None:
            obj.close()
            obj.close()
            assert obj.closed
    with pytest.raises(ValueError, match="^KVM_GET_REGS on closed vCPU fd$"):
        vcpu.get_regs()
    with pytest.raises(ValueError, match="^KVM_RUN on closed vCPU fd$"):
        vcpu.run()
    with pytest.raises(ValueError, match="^KVM_RUN on closed vCPU fd$"):
        vcpu.run_raw()
    with pytest.raises(ValueError, match="^KVM_CHECK_EXTENSION on closed VM fd$"):
        vm.check_extension(Cap.USER_MEMORY)
    with pytest.raises(ValueError, match="^KVM_CREATE_VM on closed /dev/kvm fd$"):
        kvm.create_vm()
    with pytest.raises(ValueError, match="closed vCPU fd"):
        vcpu.fileno()


def test_fileno_works_with_fstat_and_select(kvm: Kvm, vm: Vm) -> None:
    """fileno() makes the objects usable where Python wants a file: os.fstat of /dev/kvm's is the
    device, the VM's and vCPU's are KVM's anon inodes, select() takes the objects themselves."""
    with vm.create_vcpu(0) as vcpu:
        objects = [kvm, vm, vcpu]
        assert [o.fileno() for o in objects] == [kvm.fd, vm.fd, vcpu.fd]
        assert os.fstat(kvm.fileno()).st_rdev == os.stat(kvm.path).st_rdev
        links = [os.readlink(f"/proc/self/fd/{o.fileno()}") for o in (vm, vcpu)]
        assert links == ["anon_inode:kvm-vm", "anon_inode:kvm-vcpu:0"], links
        assert os.fstat(vm.fileno()).st_ino == os.fstat(vcpu.fileno()).st_ino  # one shared anon inode
        readable, writable, _ = select.select(objects, objects, [], 0)
        assert set(map(id, readable + writable)) <= set(map(id, objects))


def test_run_raw_gives_the_kernels_answer(vm: Vm) -> None:
    """run_raw() is one bare KVM_RUN (the selftests' __vcpu_run): with immediate_exit set, KVM_RUN
    fails with EINTR, which run_raw() returns as is while run() reports it as KVM_EXIT_INTR; a VM
    without memory (64 MMU pages, as test_zero_memory_regions() sets) exits with
    KVM_EXIT_INTERNAL_ERROR and return code 0."""
    vm.ioctl(KVM_SET_NR_MMU_PAGES, 64)  # without it KVM_RUN fails with ENOSPC (measured on kvm_pvm)
    with vm.create_vcpu(0) as vcpu:
        vcpu.kvm_run.immediate_exit = 1
        err, _ = vcpu.run_raw()
        assert err == errno.EINTR, errno.errorcode.get(err, err)
        assert vcpu.run() == ExitReason.INTR
        vcpu.kvm_run.immediate_exit = 0
        assert vcpu.run_raw() == (0, ExitReason.INTERNAL_ERROR)


def test_eio_says_why(vm: Vm) -> None:
    """An EIO from a VM or vCPU ioctl is followed by a KVM_CHECK_EXTENSION probe of the VM fd (the
    selftests' __TEST_ASSERT_VM_VCPU_IOCTL); when that fails too, the error says why. A forked child
    gets EIO for both (KVM checks kvm->mm before anything), so its errors name the owning process."""
    with vm.create_vcpu(0) as vcpu:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report both errors, never return into pytest
            try:
                lines = []
                for call in (lambda: vm.check_extension(Cap.USER_MEMORY), vcpu.get_regs):
                    try:
                        call()
                        lines.append("no error")
                    except KvmError as e:
                        lines.append(f"{e.errno} {e.note}")
                os.write(write_end, "\n".join(lines).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as f:
            report = f.read().splitlines()
        os.waitpid(pid, 0)
        note = f"the VM belongs to process {os.getpid()}: KVM refuses its ioctls from any other process"
        assert report == [f"{errno.EIO} {note}"] * 2, report
        assert vm.check_extension(Cap.USER_MEMORY) > 0 and vcpu.get_regs() is not None  # fine in the owner
