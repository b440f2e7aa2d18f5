"""Memslots, ported from the kernel's tools/testing/selftests/kvm/set_memory_region_test.c (6.12,
and what 7.3 adds): flag validation on KVM_SET_USER_MEMORY_REGION and ..._REGION2,
KVM_CAP_NR_MEMSLOTS slots, a vCPU with no memory at all, overlapping slots and guest_memfd bindings
(7.3: overlap inside the guest_memfd alone, too), guest_memfd bindings (offsets, foreign fds),
moving or deleting a slot while a guest keeps reading from it (guest/memslot_touch.S), and an MMIO
access while the CPU delivers an exception (7.3's test_mmio_during_vectoring(),
guest/mmio_during_vectoring.S)."""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from vmm import (
    PAGE_SIZE,
    Backing,
    Cap,
    ExitHandlers,
    ExitReason,
    Kvm,
    Machine,
    MemFlag,
    Region,
    Ucall,
    UcallCmd,
    UnexpectedExit,
    Vcpu,
    Vm,
    VmType,
    load_guest,
)
from vmm.kvm import syscalls, uapi
from vmm.kvm.exits import InternalErrorExit, MemoryFaultExit, MmioExit
from vmm.kvm.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEMORY_EXIT_FLAG_PRIVATE
from vmm.tools.pytest_plugin import require, require_private_mem

from helpers import (
    MEM_REGION_GPA,
    MEM_REGION_SIZE,
    MEM_REGION_SLOT,
    NO_GUEST_MEMFD,
    expect_errno,
    gmem_bind_overlap_errno,
    kernel_version,
)

MMIO_VAL = 0xBEEF

KVM_X86_QUIRK_SLOT_ZAP_ALL = 1 << 7
MOVE_DELETE_LOOPS = 10  # the kernel's default (main(): loops = 10 unless -l N)


def anonymous(size: int) -> tuple[mmap.mmap, int]:
    """An anonymous private mapping and its address (vm_userspace_mem_region_add's backing)."""
    m = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return m, syscalls.address_of(m)


@pytest.fixture
def gmem_vm(kvm: Kvm) -> Iterator[Vm]:
    """A VM that takes KVM_MEM_GUEST_MEMFD slots: the default VM where its fd reports
    KVM_CAP_GUEST_MEMFD (6.18), else KVM_X86_SW_PROTECTED_VM (what the 6.12 test uses)."""
    with kvm.create_vm() as vm:
        if vm.check_extension(Cap.GUEST_MEMFD):
            yield vm
            return
    require_private_mem(kvm)
    with kvm.create_vm(VmType.SW_PROTECTED) as vm:
        require(vm.check_extension(Cap.GUEST_MEMFD) > 0, "KVM_CAP_GUEST_MEMFD on a VM")
        yield vm


def test_zero_memory_regions(kvm: Kvm) -> None:
    """set_memory_region_test.c: test_zero_memory_regions(). KVM_RUN on a vCPU of a VM with no
    memslots at all exits with KVM_EXIT_INTERNAL_ERROR (the reset-vector fetch cannot be emulated)."""
    with kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        vm.ioctl(uapi.KVM_SET_NR_MMU_PAGES, 64)
        reason = vcpu.run()
        assert reason == ExitReason.INTERNAL_ERROR, f"unexpected {vcpu.exit(reason)}"


def test_invalid_memory_region_flags(kvm: Kvm) -> None:
    """set_memory_region_test.c: test_invalid_memory_region_flags(). Every flag bit KVM does not
    support is EINVAL on both ioctls, KVM_MEM_GUEST_MEMFD is EINVAL on v1, and a guest_memfd slot
    refuses LOG_DIRTY_PAGES and READONLY. The supported set comes from capabilities (READONLY_MEM,
    and GUEST_MEMFD on the VM fd) where 6.12 derives GUEST_MEMFD from KVM_CAP_MEMORY_ATTRIBUTES."""
    vm_type = VmType.SW_PROTECTED if VmType.SW_PROTECTED in kvm.vm_types() else VmType.DEFAULT
    backing, addr = anonymous(MEM_REGION_SIZE)
    with kvm.create_vm(vm_type) as vm:
        supported = MemFlag.LOG_DIRTY_PAGES
        if vm.check_extension(Cap.READONLY_MEM):
            supported |= MemFlag.READONLY
        if vm.check_extension(Cap.GUEST_MEMFD):
            supported |= MemFlag.GUEST_MEMFD
        v2_only = MemFlag.GUEST_MEMFD
        for bit in range(32):
            flag = 1 << bit
            if supported & flag and not v2_only & flag:
                continue
            expect_errno(
                errno.EINVAL,
                lambda: vm.set_user_memory_region(0, flag, 0, MEM_REGION_SIZE, addr),
                f"KVM_SET_USER_MEMORY_REGION with v2-only or unsupported flag {flag:#x}",
            )
            if supported & flag:
                continue
            expect_errno(
                errno.EINVAL,
                lambda: vm.set_user_memory_region2(0, flag, 0, MEM_REGION_SIZE, addr),
                f"KVM_SET_USER_MEMORY_REGION2 with unsupported flag {flag:#x}",
            )
        if supported & MemFlag.GUEST_MEMFD:
            with vm.create_guest_memfd(MEM_REGION_SIZE) as gmem:
                for extra in (MemFlag.LOG_DIRTY_PAGES, MemFlag.READONLY):
                    expect_errno(
                        errno.EINVAL,
                        lambda: vm.set_user_memory_region2(
                            0, extra | MemFlag.GUEST_MEMFD, 0, MEM_REGION_SIZE, addr, gmem.fd, 0
                        ),
                        f"{extra.name} on a guest_memfd slot",
                    )
    backing.close()


def test_add_max_memory_regions(kvm: Kvm, record_property: Callable[[str, object], None]) -> None:
    """set_memory_region_test.c: test_add_max_memory_regions(). Slots 0..KVM_CAP_NR_MEMSLOTS-1
    can all be added (one page each, carved from one mapping as the kernel test does, so the cost
    is the ioctls themselves; the time is recorded, not asserted); one more is EINVAL."""
    max_slots = kvm.check_extension(Cap.NR_MEMSLOTS)
    assert max_slots > 0, "KVM_CAP_NR_MEMSLOTS should be greater than 0"
    mem, addr = anonymous(max_slots * PAGE_SIZE)
    extra, extra_addr = anonymous(PAGE_SIZE)
    with kvm.create_vm() as vm:
        start = time.perf_counter()
        for slot in range(max_slots):
            vm.set_user_memory_region(slot, 0, slot * PAGE_SIZE, PAGE_SIZE, addr + slot * PAGE_SIZE)
        elapsed = time.perf_counter() - start
        expect_errno(
            errno.EINVAL,
            lambda: vm.set_user_memory_region(max_slots, 0, max_slots * PAGE_SIZE, PAGE_SIZE, extra_addr),
            "one slot past KVM_CAP_NR_MEMSLOTS",
        )
    mem.close()
    extra.close()
    record_property("memslots", max_slots)
    record_property("seconds_to_add_all", round(elapsed, 3))
    print(f"added {max_slots} memslots in {elapsed:.2f} s")


@pytest.mark.beyond_kernel
def test_add_overlapping_memory_regions(vm: Vm) -> None:
    """The shared-memory half of test_add_overlapping_private_memory_regions(): a slot whose GPA
    range overlaps another slot's (front half, back half, inside, around it) is EEXIST; an adjacent
    one is fine."""
    backing, addr = anonymous(4 * MEM_REGION_SIZE)
    vm.set_user_memory_region(MEM_REGION_SLOT, 0, MEM_REGION_GPA, 2 * MEM_REGION_SIZE, addr)
    overlapping = {
        "front half": (MEM_REGION_GPA - MEM_REGION_SIZE, 2 * MEM_REGION_SIZE),
        "back half": (MEM_REGION_GPA + MEM_REGION_SIZE, 2 * MEM_REGION_SIZE),
        "inside": (MEM_REGION_GPA + PAGE_SIZE, PAGE_SIZE),
        "around": (MEM_REGION_GPA - MEM_REGION_SIZE, 4 * MEM_REGION_SIZE),
    }
    for name, (gpa, size) in overlapping.items():
        expect_errno(
            errno.EEXIST,
            lambda: vm.set_user_memory_region(MEM_REGION_SLOT + 1, 0, gpa, size, addr),
            f"slot overlapping the {name}",
        )
    vm.set_user_memory_region(MEM_REGION_SLOT + 1, 0, MEM_REGION_GPA + 2 * MEM_REGION_SIZE, MEM_REGION_SIZE, addr)
    backing.close()


def test_add_overlapping_private_memory_regions(gmem_vm: Vm) -> None:
    """set_memory_region_test.c (7.3): test_add_overlapping_private_memory_regions(). Two guest_memfd
    slots on one 10M file (slot 10 at 3G binds [0, 4M), slot 11 at 6G binds [4M, 8M)); slot 10
    deleted, re-adding it at 3G (no GPA overlap) with offset 2M or 6M overlaps slot 11's range
    inside the guest_memfd only: EEXIST from Linux 7.2 on, EINVAL before (kvm_gmem_bind() changed,
    no capability tells; the 6.12 test has no such case); re-adding it over the front or back half
    of slot 11's GPA range is EEXIST everywhere. Needs guest_memfd slots only (no attributes), so
    it runs on any VM whose fd reports KVM_CAP_GUEST_MEMFD, not only on KVM_X86_SW_PROTECTED_VM."""
    vm, gmem_slot = gmem_vm, MemFlag.GUEST_MEMFD
    with vm.create_guest_memfd(MEM_REGION_SIZE * 5) as gmem:
        vm.set_user_memory_region2(MEM_REGION_SLOT, gmem_slot, MEM_REGION_GPA, MEM_REGION_SIZE * 2, 0, gmem.fd, 0)
        vm.set_user_memory_region2(
            MEM_REGION_SLOT + 1, gmem_slot, MEM_REGION_GPA * 2, MEM_REGION_SIZE * 2, 0, gmem.fd, MEM_REGION_SIZE * 2
        )
        vm.set_user_memory_region2(MEM_REGION_SLOT, gmem_slot, MEM_REGION_GPA, 0, 0, NO_GUEST_MEMFD, 0)
        for half, offset in (("front", MEM_REGION_SIZE), ("back", MEM_REGION_SIZE * 3)):
            expect_errno(
                gmem_bind_overlap_errno(),  # 7.3's test: EEXIST (7.2+); EINVAL before 7.2
                lambda: vm.set_user_memory_region2(
                    MEM_REGION_SLOT, gmem_slot, MEM_REGION_GPA, MEM_REGION_SIZE * 2, 0, gmem.fd, offset
                ),
                f"guest_memfd binding overlapping the {half} half of another's, no GPA overlap",
            )
        for name, gpa in (
            ("front", MEM_REGION_GPA * 2 - MEM_REGION_SIZE),
            ("back", MEM_REGION_GPA * 2 + MEM_REGION_SIZE),
        ):
            expect_errno(
                errno.EEXIST,
                lambda: vm.set_user_memory_region2(MEM_REGION_SLOT, gmem_slot, gpa, MEM_REGION_SIZE * 2, 0, gmem.fd, 0),
                f"guest_memfd slot overlapping the {name} half of another",
            )


def bind_guest_memfd(vm: Vm, fd: int, offset: int = 0, size: int = MEM_REGION_SIZE) -> None:
    """test_invalid_guest_memfd()'s call: slot 10 at MEM_REGION_GPA bound to ``fd`` at ``offset``."""
    vm.set_user_memory_region2(MEM_REGION_SLOT, MemFlag.GUEST_MEMFD, MEM_REGION_GPA, size, 0, fd, offset)


def test_add_private_memory_region(kvm: Kvm, gmem_vm: Vm) -> None:
    """set_memory_region_test.c: test_add_private_memory_region(). A guest_memfd slot refuses
    /dev/kvm's fd, the VM's own fd, a plain memfd and another VM's guest_memfd (EINVAL; that other
    VM binds it fine), and every offset that is not page aligned; offset 0 binds."""
    vm = gmem_vm
    expect_errno(errno.EINVAL, lambda: bind_guest_memfd(vm, kvm.fd), "/dev/kvm fd")
    expect_errno(errno.EINVAL, lambda: bind_guest_memfd(vm, vm.fd), "the VM's own fd")
    memfd = os.memfd_create("not-guest-memfd", os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, MEM_REGION_SIZE)
        expect_errno(errno.EINVAL, lambda: bind_guest_memfd(vm, memfd), "regular memfd")
    finally:
        os.close(memfd)
    with kvm.create_vm(vm.type) as vm2, vm2.create_guest_memfd(MEM_REGION_SIZE) as foreign:
        expect_errno(errno.EINVAL, lambda: bind_guest_memfd(vm, foreign.fd), "another VM's guest_memfd")
        bind_guest_memfd(vm2, foreign.fd)
    with vm.create_guest_memfd(MEM_REGION_SIZE) as gmem:
        for offset in range(1, PAGE_SIZE):
            expect_errno(errno.EINVAL, lambda: bind_guest_memfd(vm, gmem.fd, offset), f"unaligned offset {offset:#x}")
        bind_guest_memfd(vm, gmem.fd, 0)


@pytest.mark.beyond_kernel
def test_guest_memfd_offset_out_of_range(gmem_vm: Vm) -> None:
    """Beyond the kernel test (kvm_gmem_bind()'s range check): a binding that starts at or past the
    end of the guest_memfd, or runs past it, is EINVAL; the last in-range window binds."""
    vm = gmem_vm
    with vm.create_guest_memfd(4 * MEM_REGION_SIZE) as gmem:
        for offset, size in (
            (4 * MEM_REGION_SIZE, MEM_REGION_SIZE),
            (3 * MEM_REGION_SIZE + PAGE_SIZE, MEM_REGION_SIZE),
            (0, 5 * MEM_REGION_SIZE),
            (1 << 63, MEM_REGION_SIZE),
        ):
            expect_errno(
                errno.EINVAL,
                lambda: bind_guest_memfd(vm, gmem.fd, offset, size),
                f"offset {offset:#x} + size {size:#x} in a {gmem.size:#x}-byte guest_memfd",
            )
        bind_guest_memfd(vm, gmem.fd, 3 * MEM_REGION_SIZE)


# --- moving and deleting a slot under a running guest ---------------------------------------


class AnswerMmio(ExitHandlers):
    """vcpu_worker()'s MMIO branch: the only MMIO expected is an 8-byte read of MEM_REGION_GPA
    (the slot is gone or being moved); it reads MMIO_VAL."""

    def on_mmio(self, vcpu: Vcpu, exit: MmioExit) -> bool:
        assert not exit.is_write, f"unexpected MMIO write: {exit}"
        assert exit.length == 8, f"unexpected MMIO size: {exit}"
        assert exit.phys_addr == MEM_REGION_GPA, f"unexpected MMIO address: {exit}"
        vcpu.set_mmio_data(MMIO_VAL.to_bytes(8, "little"))
        return True


class VcpuWorker(threading.Thread):
    """vcpu_worker(): runs the guest until DONE (or an exit nobody handles) on its own thread;
    every SYNC is posted to ``ready`` like the kernel test's semaphore."""

    def __init__(self, machine: Machine) -> None:
        super().__init__(name="vcpu0", daemon=True)
        self.machine = machine
        self.ready = threading.Semaphore(0)
        self.first_sync: Ucall | None = None
        self.result: object = None
        self.error: BaseException | None = None

    def _on_sync(self, uc: Ucall) -> None:
        if self.first_sync is None:
            self.first_sync = uc
        self.ready.release()

    def run(self) -> None:
        try:
            self.result = self.machine.runners[0].run_until_done(timeout=10, on_sync=self._on_sync)
        except BaseException as e:  # handed to the test thread by finish()
            self.error = e

    def wait_for_vcpu(self) -> None:
        """wait_for_vcpu(): a SYNC within 2 s, then time for the vCPU to re-enter the guest_image."""
        if not self.ready.acquire(timeout=2):
            self.join(0.1)
            raise AssertionError(f"no SYNC from the guest within 2 s: {self.error or 'vCPU still running'}")
        time.sleep(0.1)

    def finish(self) -> object:
        """Join the thread; its result, or raise what stopped it."""
        self.join(15)
        assert not self.is_alive(), "vCPU thread did not finish"
        if self.error is not None:
            raise self.error
        return self.result

    def stop(self) -> None:
        """Kick the vCPU out of the guest and join (cleanup after a failure)."""
        runner = self.machine.runners[0]
        while self.is_alive():
            runner.timed_out = True
            runner.vcpu.kick()
            self.join(0.1)


@contextmanager
def spawn_vm(kvm: Kvm, delete_variant: bool, zap_quirk_disabled: bool) -> Iterator[tuple[Machine, VcpuWorker]]:
    """spawn_vm(): a machine with the zeroed 2 MiB region in slot 10 (identity-mapped, THP
    advised), memslot_touch running on a worker thread, and its first SYNC received."""
    with Machine(kvm=kvm, handlers=AnswerMmio(), output=lambda *_: None) as m:
        m.add_memory(MEM_REGION_GPA, MEM_REGION_SIZE, slot=MEM_REGION_SLOT, hugepages="thp")
        m.load(load_guest("memslot_touch"), arg=MEM_REGION_GPA | int(delete_variant))
        if zap_quirk_disabled:
            m.vm.enable_cap(Cap.DISABLE_QUIRKS2, KVM_X86_QUIRK_SLOT_ZAP_ALL)
        worker = VcpuWorker(m)
        worker.start()
        try:
            worker.wait_for_vcpu()
            yield m, worker
        finally:
            worker.stop()


def write_u64(region: Region, value: int) -> None:
    """WRITE_ONCE(*hva, value) at the start of the region's host mapping, wherever its GPA is now."""
    region.host_view[:8] = value.to_bytes(8, "little")


@pytest.fixture(params=[False, True], ids=["slot_zap_quirk", "no_slot_zap_quirk"])
def zap_quirk_disabled(request: pytest.FixtureRequest, kvm: Kvm) -> bool:
    """Both runs of the kernel's main(): with KVM_X86_QUIRK_SLOT_ZAP_ALL, and with it disabled."""
    if request.param:
        quirks = kvm.check_extension(Cap.DISABLE_QUIRKS2)
        require(quirks & KVM_X86_QUIRK_SLOT_ZAP_ALL != 0, "KVM_X86_QUIRK_SLOT_ZAP_ALL in KVM_CAP_DISABLE_QUIRKS2")
    return request.param


def test_move_memory_region(kvm: Kvm, zap_quirk_disabled: bool) -> None:
    """set_memory_region_test.c: test_move_memory_region(). The guest spins reading MEM_REGION_GPA
    while the host moves slot 10 one page down (the guest must not see the 2 the host writes at the
    slot's start then, only 0 or MMIO_VAL), writes 1 and moves it back: the guest sees 1 and finishes.
    memslot_touch's GUEST_ASSERTs carry the kernel guest's checks."""
    for _ in range(MOVE_DELETE_LOOPS):
        with spawn_vm(kvm, delete_variant=False, zap_quirk_disabled=zap_quirk_disabled) as (m, worker):
            region = m.memory.by_slot(MEM_REGION_SLOT)
            m.memory.move(MEM_REGION_SLOT, MEM_REGION_GPA - PAGE_SIZE)
            write_u64(region, 2)
            time.sleep(0.1)  # the guest may see the slot invalid and exit as MMIO meanwhile
            write_u64(region, 1)  # before the move back, or the guest could race it and see 2
            m.memory.move(MEM_REGION_SLOT, MEM_REGION_GPA)
            worker.wait_for_vcpu()
            worker.wait_for_vcpu()  # the sync deferred from the misaligned phase
            result = worker.finish()
            assert isinstance(result, Ucall) and result.cmd == UcallCmd.DONE, f"guest ended with {result}"


def test_delete_memory_region(kvm: Kvm, zap_quirk_disabled: bool) -> None:
    """set_memory_region_test.c: test_delete_memory_region(). With the guest spinning on
    MEM_REGION_GPA: deleting slot 10 turns its reads into MMIO (MMIO_VAL), re-adding it shows 0,
    deleting it again shows MMIO_VAL; deleting slot 0 (code, stack, page tables) then ends the
    guest with KVM_EXIT_SHUTDOWN or KVM_EXIT_INTERNAL_ERROR, the latter with RIP in the final spin."""
    for _ in range(MOVE_DELETE_LOOPS):
        with spawn_vm(kvm, delete_variant=True, zap_quirk_disabled=zap_quirk_disabled) as (m, worker):
            assert worker.first_sync is not None
            final_rip_start, final_rip_end = worker.first_sync.args[1:3]
            m.memory.delete(MEM_REGION_SLOT)
            worker.wait_for_vcpu()
            m.add_memory(MEM_REGION_GPA, MEM_REGION_SIZE, slot=MEM_REGION_SLOT, hugepages="thp")
            worker.wait_for_vcpu()
            m.memory.delete(MEM_REGION_SLOT)
            worker.wait_for_vcpu()
            assert m.runners[0].exit_counts[ExitReason.MMIO] > 0, "no read of the deleted slot exited as MMIO"
            m.memory.delete(0)
            with pytest.raises(UnexpectedExit) as stopped:
                worker.finish()
            reason = stopped.value.exit.reason
            assert reason in (ExitReason.SHUTDOWN, ExitReason.INTERNAL_ERROR), f"unexpected {stopped.value.exit}"
            if reason == ExitReason.INTERNAL_ERROR:  # on AMD a shutdown has already reset RIP
                rip = m.vcpus[0].get_regs().rip
                assert final_rip_start <= rip < final_rip_end, (
                    f"RIP {rip:#x} outside the final spin [{final_rip_start:#x}, {final_rip_end:#x})"
                )


# --- an MMIO access while delivering an exception (7.3's test_mmio_during_vectoring()) -------------

GP_VECTOR = 13
IDT_ENTRY_SIZE = 16  # sizeof(struct idt_entry) in long mode
VECTORING_TIMEOUT = 10.0


def test_mmio_during_vectoring(kvm: Kvm) -> None:
    """set_memory_region_test.c (7.3): test_mmio_during_vectoring(). The guest
    (guest/mmio_during_vectoring.S) loads an IDT based at MEM_REGION_GPA, which its page tables map
    (virt_map(vm, MEM_REGION_GPA, MEM_REGION_GPA, 1)) but no memslot backs, and stores to a
    non-canonical address. Delivering the #GP reads the gate at IDT base + 13 * 16: an MMIO access
    while vectoring, which KVM cannot emulate, so KVM_RUN exits KVM_EXIT_INTERNAL_ERROR with suberror
    KVM_INTERNAL_ERROR_DELIVERY_EV and data[3] = that GPA (kvm_prepare_event_vectoring_exit(), reached
    from x86_emulate_instruction() on X86EMUL_UNHANDLEABLE_VECTORING: svm/vmx
    check_emulate_instruction()). The kernel asserts ndata != 4; KVM fills 5 (info2, exit reason,
    info1, gpa, last_vmentry_cpu), so this asserts more than 4, data[3] included.
    Gates, no capability exists for either: that handling arrived in Linux 6.14 (6.12's SVM emulates
    the faulting instruction again and again instead, never returning to userspace); and kvm_pvm
    delivers guest exceptions in software, where this guest ends in KVM_EXIT_SHUTDOWN (seen on the
    6.18 kvm_pvm host)."""
    require(
        not os.path.isdir("/sys/module/kvm_pvm"),
        "exception delivery through the guest IDT by VMX/SVM (kvm_pvm delivers exceptions in software)",
    )
    require(
        kernel_version() >= (6, 14),
        "KVM_INTERNAL_ERROR_DELIVERY_EV for MMIO during event vectoring (Linux 6.14+)",
    )
    with Machine(kvm=kvm, handlers=ExitHandlers(), output=lambda *_: None) as m:
        m.load(load_guest("mmio_during_vectoring"), arg=MEM_REGION_GPA)
        assert m.page_tables is not None
        m.page_tables.map(MEM_REGION_GPA, PAGE_SIZE, page_size=PAGE_SIZE)  # virt_map(..., 1)
        m.page_tables.write()
        assert not any(r.gpa <= MEM_REGION_GPA < r.end for r in m.memory.regions), "MEM_REGION_GPA has a memslot"
        with pytest.raises(UnexpectedExit) as stopped:
            m.run(timeout=VECTORING_TIMEOUT)
        ex = stopped.value.exit
        assert isinstance(ex, InternalErrorExit), f"expected KVM_EXIT_INTERNAL_ERROR, got {ex}"
        assert ex.suberror == uapi.InternalError.DELIVERY_EV, f"Unexpected suberror: {ex}"
        assert len(ex.data) > 4, f"Unexpected internal error data array size = {len(ex.data)}: {ex}"
        expected_gpa = MEM_REGION_GPA + GP_VECTOR * IDT_ENTRY_SIZE
        assert ex.data[3] == expected_gpa, f"Unexpected GPA = {ex.data[3]:#x} (expected {expected_gpa:#x})"


# --- the private-memory cases on the VM the kernel uses for them ---------------------------------
#
# test_add_private_memory_region() and test_add_overlapping_private_memory_regions() above run on
# whichever VM takes guest_memfd slots (a default VM on 6.18). The kernel runs them on
# KVM_X86_SW_PROTECTED_VM (vm_create_barebones_type()); these add what needs private memory: the
# binding that is finally accepted really serves private accesses, and dies with the guest_memfd's
# fd (the kernel test closes its fd right after binding: kvm_gmem_bind() keeps no reference, "the
# file pins KVM, not the other way 'round"); and the guest_memfd-range overlap the kernel test's
# comment describes (its calls also overlap in GPA, so the EEXIST it sees comes from the memslot
# check; a binding that overlaps only inside the guest_memfd is refused by kvm_gmem_bind()).

PRIVATE_TIMEOUT = 60.0


def bind(
    vm: Vm,
    fd: int,
    offset: int = 0,
    slot: int = MEM_REGION_SLOT,
    gpa: int = MEM_REGION_GPA,
    size: int = MEM_REGION_SIZE,
) -> None:
    """vm_set_user_memory_region2(vm, slot, KVM_MEM_GUEST_MEMFD, gpa, size, 0, fd, offset)."""
    vm.set_user_memory_region2(slot, MemFlag.GUEST_MEMFD, gpa, size, 0, fd, offset)


def delete(vm: Vm, slot: int, gpa: int) -> None:
    """vm_set_user_memory_region2(vm, slot, KVM_MEM_GUEST_MEMFD, gpa, 0, NULL, -1, 0)."""
    vm.set_user_memory_region2(slot, MemFlag.GUEST_MEMFD, gpa, 0, 0, NO_GUEST_MEMFD, 0)


@pytest.mark.private_mem
def test_add_private_memory_region_sw_protected(private_kvm: Kvm) -> None:
    """set_memory_region_test.c: test_add_private_memory_region(), on a SW_PROTECTED VM. Binding
    slot 10 to /dev/kvm's fd, the VM's fd, a plain memfd, or another SW_PROTECTED VM's
    guest_memfd is EINVAL (that VM binds it fine); so is every unaligned offset 1..4095; offset 0
    binds. Beyond the kernel test: the slot's pages turned private are read by a vCPU through that
    binding (a fresh private page reads zeros, not the shared side); once the guest_memfd's fd is
    closed (the kernel test's close(memfd)), the binding is gone: the next private access exits
    KVM_EXIT_MEMORY_FAULT (EFAULT, flags PRIVATE, that page). Kernel cases and extra checks in one
    test, so not marked beyond_kernel."""
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
        assert region.flags & MemFlag.GUEST_MEMFD and region.gmem is not None and region.gmem is not gmem  # its dup

        page = MEM_REGION_GPA + MEM_REGION_SIZE - PAGE_SIZE
        m.load(load_guest("private_mem_kvm_exits"), arg=page)
        m.vm.set_memory_attributes(MEM_REGION_GPA, MEM_REGION_SIZE, KVM_MEMORY_ATTRIBUTE_PRIVATE)
        m.memory.write(page, b"\xff" * 8)  # the shared side, which a private read must not see
        uc = m.run(timeout=PRIVATE_TIMEOUT)
        assert isinstance(uc, Ucall) and uc.cmd == UcallCmd.SYNC and uc.stage == 1, f"got {uc}"
        assert uc.args[1] == 0, f"private read of {page:#x} through the bound guest_memfd gave {uc.args[1]:#x}"

        gmem.close()
        region.gmem.close()  # the file's last fd: kvm_gmem_release() clears the binding, zaps its SPTEs
        vcpu = m.vcpus[0]
        err, reason = vcpu.run_raw()  # the guest keeps reading the page
        fault = vcpu.exit(reason)
        assert err == errno.EFAULT and isinstance(fault, MemoryFaultExit), f"{errno.errorcode.get(err, err)}, {fault}"
        assert (fault.flags, fault.gpa, fault.size) == (KVM_MEMORY_EXIT_FLAG_PRIVATE, page, PAGE_SIZE), str(fault)


@pytest.mark.private_mem
def test_add_overlapping_private_memory_regions_sw_protected(private_kvm: Kvm) -> None:
    """set_memory_region_test.c (7.3): test_add_overlapping_private_memory_regions(), on a
    SW_PROTECTED VM. One 10M guest_memfd: slot 10 at 3G binds [0, 4M), slot 11 at 6G binds
    [4M, 8M); slot 10 deleted, re-adding it at 3G with offset 2M or 6M (overlap in the guest_memfd,
    not in GPA) is EEXIST from Linux 7.2 on and EINVAL before (kvm_gmem_bind() changed; no
    capability tells); re-adding it over the front or the back half of slot 11's GPAs is EEXIST.
    Beyond the kernel test: GPAs that overlap nothing but a guest_memfd range already bound to slot
    11 (whole, front half, back half, one page) give the same EEXIST/EINVAL; the range slot 10 gave
    up can be bound again, and after slot 11 is deleted so can its range. Kernel cases and extra
    checks in one test, so not marked beyond_kernel."""
    with private_kvm.create_vm(VmType.SW_PROTECTED) as vm, vm.create_guest_memfd(MEM_REGION_SIZE * 5) as gmem:
        bind(vm, gmem.fd, 0, MEM_REGION_SLOT, MEM_REGION_GPA, MEM_REGION_SIZE * 2)
        bind(vm, gmem.fd, MEM_REGION_SIZE * 2, MEM_REGION_SLOT + 1, MEM_REGION_GPA * 2, MEM_REGION_SIZE * 2)
        delete(vm, MEM_REGION_SLOT, MEM_REGION_GPA)
        for half, offset in (("front", MEM_REGION_SIZE), ("back", MEM_REGION_SIZE * 3)):
            expect_errno(
                gmem_bind_overlap_errno(),  # 7.3's test: EEXIST (7.2+); EINVAL before 7.2
                lambda: bind(vm, gmem.fd, offset, MEM_REGION_SLOT, MEM_REGION_GPA, MEM_REGION_SIZE * 2),
                f"Overlapping guest_memfd() bindings should fail with EEXIST ({half} half, no GPA overlap)",
            )
        for half, gpa in (
            ("front", MEM_REGION_GPA * 2 - MEM_REGION_SIZE),
            ("back", MEM_REGION_GPA * 2 + MEM_REGION_SIZE),
        ):
            expect_errno(
                errno.EEXIST,
                lambda: bind(vm, gmem.fd, 0, MEM_REGION_SLOT, gpa, MEM_REGION_SIZE * 2),
                f"Overlapping guest_memfd() bindings should fail with EEXIST ({half} half)",
            )

        free_gpa = MEM_REGION_GPA * 4  # overlaps no memslot
        for what, offset, size in (
            ("all of", MEM_REGION_SIZE * 2, MEM_REGION_SIZE * 2),
            ("the front half of", MEM_REGION_SIZE, MEM_REGION_SIZE * 2),
            ("the back half of", MEM_REGION_SIZE * 3, MEM_REGION_SIZE),
            ("one page of", MEM_REGION_SIZE * 4 - PAGE_SIZE, PAGE_SIZE),
        ):
            expect_errno(
                gmem_bind_overlap_errno(),  # EINVAL before 7.2, EEXIST from 7.2
                lambda: bind(vm, gmem.fd, offset, MEM_REGION_SLOT, free_gpa, size),
                f"a binding of {what} slot 11's guest_memfd range",
            )
        bind(vm, gmem.fd, 0, MEM_REGION_SLOT, free_gpa, MEM_REGION_SIZE * 2)  # what slot 10 gave up
        delete(vm, MEM_REGION_SLOT + 1, MEM_REGION_GPA * 2)
        bind(vm, gmem.fd, MEM_REGION_SIZE * 2, MEM_REGION_SLOT + 1, free_gpa + MEM_REGION_SIZE * 2, MEM_REGION_SIZE * 2)
