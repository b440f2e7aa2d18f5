"""Guest memory: each memslot kept as the kernel's struct and re-issued to move or delete it (kernel
lib/kvm_util.c: struct userspace_mem_region, vm_mem_region_move, vm_mem_region_delete), one
guest_memfd fd per memslot (vm_mem_add's dup), no fd left behind by a failed add, host access
refused where vmm's attribute map says private, and a guest that asks to make what vmm placed for
it (image, page tables, stacks) private stopped with a report that names it."""

from __future__ import annotations

import errno
import os
import re
import struct
from collections.abc import Callable

import pytest

from vmm import (
    PAGE_SIZE,
    Backing,
    Converter,
    GmemFlag,
    GuestError,
    Kvm,
    KvmError,
    Machine,
    PrivateMemoryHandlers,
    Vm,
    VmmError,
    VmType,
    load_guest,
)
from vmm.guest.layout import DATA_GPA, GDT_GPA, IMAGE_END, IMAGE_GPA, REAL_STACK_SIZE, REAL_STACK_TOP
from vmm.kvm import uapi
from vmm.kvm.caps import hypercall_exits
from vmm.kvm.exits import HypercallExit
from vmm.kvm.syscalls import address_of
from vmm.kvm.uapi import KVM_HC_MAP_GPA_RANGE, KVM_MAP_GPA_RANGE_ENCRYPTED, KVM_MEMORY_ATTRIBUTE_PRIVATE, ExitReason
from vmm.memory import AttributeMap
from vmm.tools.pytest_plugin import require, require_gmem_flags

from helpers import expect_done, expect_errno, expect_sync, mapping_count, no_gc, open_fds

SLOT = 10
SIZE = 2 << 20
GPA_A, GPA_B = DATA_GPA, DATA_GPA + 4 * SIZE
MMAP_SHARED = int(GmemFlag.MMAP | GmemFlag.INIT_SHARED)
PATTERN = 0x1122334455667788
CYCLES = 200
TIMEOUT = 60.0  # the nested kernel runs under TCG
U64 = (1 << 64) - 1


def is_open(fd: int) -> bool:
    """Whether ``fd`` is open (open_fds() would list a just-closed one: its own listing fd takes it)."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def fill_u64(view: memoryview, value: int) -> None:
    view[:] = struct.pack("<Q", value) * (len(view) // 8)


# --- memslots as the kernel struct -------------------------------------------------------------


def test_region_is_the_kernel_struct(machine: Machine) -> None:
    """A Region holds the kvm_userspace_memory_region2 it issued; slot, gpa, size, flags and
    gmem_offset read that struct and cannot be assigned (only GuestMemory changes a slot)."""
    region = machine.add_memory(GPA_A, SIZE, slot=SLOT)
    s = region.region
    assert isinstance(s, uapi.kvm_userspace_memory_region2)
    assert region.shared_map is not None
    fields = (s.slot, s.flags, s.guest_phys_addr, s.memory_size, s.userspace_addr, s.guest_memfd_offset)
    assert fields == (SLOT, 0, GPA_A, SIZE, address_of(region.shared_map), 0)
    assert (region.slot, region.gpa, region.size, region.flags, region.gmem_offset) == (SLOT, GPA_A, SIZE, 0, 0)
    assert region.userspace_addr == s.userspace_addr and region.host_view.nbytes == SIZE
    for name in ("slot", "gpa", "size", "flags", "gmem_offset"):
        with pytest.raises(AttributeError):
            setattr(region, name, 0)


def test_move_reissues_the_struct(kvm: Kvm) -> None:
    """GuestMemory.move changes guest_phys_addr and issues the struct again: KVM then has the slot
    at the new GPA (a guest reads what the host wrote there, and a second slot over it is EEXIST)
    and not at the old one (a new slot fits there)."""
    with Machine(kvm=kvm) as m:
        region = m.add_memory(GPA_A, SIZE, slot=SLOT)
        fill_u64(m.memory.view(GPA_A, PAGE_SIZE), PATTERN)
        m.memory.move(SLOT, GPA_B)
        assert region.gpa == region.region.guest_phys_addr == GPA_B and region.end == GPA_B + SIZE
        assert m.memory.region_at(GPA_B) is region
        with pytest.raises(VmmError, match="not in any memslot"):
            m.memory.region_at(GPA_A)
        expect_errno(
            errno.EEXIST,
            lambda: m.vm.set_user_memory_region2(SLOT + 1, 0, GPA_B, SIZE, region.userspace_addr),
            "a second slot over the moved one",
        )
        m.add_memory(GPA_A, SIZE, slot=SLOT + 1)  # the old GPAs are free in KVM too
        m.load(load_guest("memory_rw"), arg=GPA_B)
        assert expect_sync(m.run(timeout=5), 1).args[1] == PATTERN
        assert expect_sync(m.run(timeout=5), 2).args[1] == ~PATTERN & U64
        expect_done(m.run(timeout=5))
        assert m.memory.read(GPA_B, 8) == struct.pack("<Q", ~PATTERN & U64)


def test_failed_move_keeps_the_struct(kvm: Kvm) -> None:
    """A move KVM refuses leaves the struct (and the GPA-sorted lists) as they were: onto slot 0's
    GPAs is EEXIST; a guest_memfd slot cannot be moved at all (EINVAL: it is immutable)."""
    with Machine(kvm=kvm) as m:
        region = m.add_memory(GPA_A, SIZE, slot=SLOT)
        with pytest.raises(KvmError) as e:
            m.memory.move(SLOT, 0)
        assert e.value.errno == errno.EEXIST and "KVM_SET_USER_MEMORY_REGION2" in str(e.value)
        assert region.gpa == region.region.guest_phys_addr == GPA_A and m.memory.region_at(GPA_A) is region
        assert m.memory.region_at(0).slot == 0
        if not m.vm.check_extension(uapi.Cap.GUEST_MEMFD):
            return
        gmem_region = m.add_memory(GPA_B, SIZE, Backing.GUEST_MEMFD, slot=SLOT + 1)
        with pytest.raises(KvmError) as e:
            m.memory.move(SLOT + 1, GPA_B + 4 * SIZE)
        assert e.value.errno == errno.EINVAL
        assert gmem_region.gpa == GPA_B and m.memory.region_at(GPA_B) is gmem_region


def test_delete_reissues_the_struct_with_size_zero(kvm: Kvm) -> None:
    """GuestMemory.delete issues the struct with memory_size 0 and closes the region's backings;
    KVM then takes the same slot number back with a different size (which it refuses for a live
    slot: EINVAL), and the GPAs for another slot."""
    with Machine(kvm=kvm) as m, no_gc():
        fds = open_fds()
        region = m.add_memory(GPA_A, SIZE, slot=SLOT)
        memfd = region.shared_fd
        assert is_open(memfd)
        m.memory.delete(SLOT)
        assert not is_open(memfd)
        assert region.size == region.region.memory_size == 0
        assert region.shared_fd == -1 and region.shared_map is None and not region.host_view.nbytes
        assert open_fds() == fds and not any(r is region for r in m.memory.regions)
        again = m.add_memory(GPA_A, 2 * SIZE, slot=SLOT)
        assert again.size == 2 * SIZE
        with pytest.raises(VmmError, match="no memslot 11"):
            m.memory.delete(SLOT + 1)


# --- one guest_memfd fd per memslot ------------------------------------------------------------


def test_each_memslot_owns_a_dup_of_the_guest_memfd(kvm: Kvm) -> None:
    """Two guest_memfd-only slots over one caller's guest_memfd (offsets 0 and SIZE) each hold their
    own fd of the same file (vm_mem_add's dup); the caller closes theirs and both slots still work:
    the host's bytes at file offset SIZE are what a guest reads at the second slot, the guest's
    writes show in that slot's view, its mincore accounting and punch_hole. Deleting a slot closes
    only its own fd, and at the end every fd and mapping is gone."""
    with Machine(kvm=kvm) as m, no_gc():
        require_gmem_flags(m.vm, MMAP_SHARED)
        conv = Converter(m.vm, m.memory)  # its accounting sums the slots' ranges of the one file
        fds, maps = open_fds(), mapping_count()
        gmem = m.vm.create_guest_memfd(2 * SIZE, MMAP_SHARED)
        fill_u64(memoryview(gmem.mmap())[SIZE : SIZE + PAGE_SIZE], PATTERN)
        first = m.add_memory(GPA_A, SIZE, Backing.GUEST_MEMFD_ONLY, slot=SLOT, gmem=gmem)
        second = m.add_memory(GPA_B, SIZE, Backing.GUEST_MEMFD_ONLY, slot=SLOT + 1, gmem=gmem, gmem_offset=SIZE)
        assert first.gmem is not None and second.gmem is not None
        assert len({gmem.fd, first.gmem.fd, second.gmem.fd}) == 3
        assert os.path.samestat(os.fstat(gmem.fd), os.fstat(second.gmem.fd))
        assert second.region.guest_memfd == second.gmem.fd and second.gmem_offset == SIZE
        caller_fd, first_fd, second_fd = gmem.fd, first.gmem.fd, second.gmem.fd

        gmem.close()  # the caller's fd (and its mapping); the slots keep theirs
        assert gmem.closed and not first.gmem.closed and not second.gmem.closed
        assert not is_open(caller_fd) and is_open(first_fd) and is_open(second_fd)
        assert m.memory.read(GPA_B, 8) == struct.pack("<Q", PATTERN)
        m.load(load_guest("memory_rw"), arg=GPA_B)
        assert expect_sync(m.run(timeout=5), 1).args[1] == PATTERN
        assert expect_sync(m.run(timeout=5), 2).args[1] == ~PATTERN & U64
        expect_done(m.run(timeout=5))
        assert m.memory.read(GPA_B + PAGE_SIZE - 8, 8) == struct.pack("<Q", ~PATTERN & U64)
        assert second.private_allocated() == PAGE_SIZE and first.private_allocated() == 0
        assert conv.private_allocated() == PAGE_SIZE  # not once per fd of the file
        second.punch_hole_private(0, PAGE_SIZE)
        assert second.private_allocated() == 0 and m.memory.read(GPA_B, 8) == bytes(8)

        m.memory.delete(SLOT + 1)
        assert second.gmem.closed and not first.gmem.closed
        assert not is_open(second_fd) and is_open(first_fd)
        first.allocate_private(0, PAGE_SIZE)  # its fd still works
        m.memory.delete(SLOT)
        assert first.gmem.closed
        assert open_fds() == fds and mapping_count() == maps


def test_dup_of_a_closed_guest_memfd_names_the_call(vm: Vm) -> None:
    """GuestMemfd.dup() on a closed guest_memfd is a KvmError naming dup and EBADF."""
    gmem = vm.create_guest_memfd(PAGE_SIZE)
    gmem.close()
    with pytest.raises(KvmError) as e:
        gmem.dup()
    assert e.value.errno == errno.EBADF and "dup" in str(e.value) and "guest_memfd" in str(e.value)


def test_memslot_cycles_leak_no_fd(kvm: Kvm) -> None:
    """CYCLES rounds of: a slot over the caller's guest_memfd added and deleted, and
    add_private_memory over two slots with both deleted. The caller's fd stays the one it was; no
    fd and no mapping is left behind, with the garbage collector off."""
    with Machine(kvm=kvm) as m, no_gc():
        require(m.vm.check_extension(uapi.Cap.GUEST_MEMFD) > 0, "KVM_CAP_GUEST_MEMFD on the VM fd")
        with m.vm.create_guest_memfd(SIZE) as gmem:

            def cycle() -> None:
                m.add_memory(GPA_A, SIZE, Backing.GUEST_MEMFD, slot=SLOT, gmem=gmem)
                m.memory.delete(SLOT)
                for r in m.add_private_memory(GPA_B, 2 * PAGE_SIZE, slots=2):
                    m.memory.delete(r.slot)

            cycle()  # warm up
            fds, maps = open_fds(), mapping_count()
            for _ in range(CYCLES):
                cycle()
            assert open_fds() == fds, "fds leaked"
            assert mapping_count() == maps, "mappings leaked"
            assert [r.slot for r in m.memory.regions] == [0]
            gmem.allocate(0, PAGE_SIZE)  # the caller's fd was never closed for it


@pytest.mark.parametrize("case", ["first slot overlaps", "second slot overlaps", "KVM refuses"])
def test_failed_add_private_memory_leaks_nothing(kvm: Kvm, case: str) -> None:
    """add_private_memory that fails (its first slot overlapping a region, its second one doing so
    after the first was bound, or KVM refusing the slot number of slot 0) raises, closes the
    guest_memfd it made and deletes the slots it had added: same fds, same mappings, same regions,
    and KVM has nothing left there either (a plain slot fits in the freed GPAs)."""
    with Machine(kvm=kvm) as m, no_gc():
        require(m.vm.check_extension(uapi.Cap.GUEST_MEMFD) > 0, "KVM_CAP_GUEST_MEMFD on the VM fd")
        m.add_memory(GPA_B, SIZE, slot=SLOT)
        fds, maps, regions = open_fds(), mapping_count(), list(m.memory.regions)
        call: Callable[[], object] = {
            "first slot overlaps": lambda: m.add_private_memory(GPA_B, SIZE),
            "second slot overlaps": lambda: m.add_private_memory(GPA_B - SIZE, 2 * SIZE, slots=2),
            "KVM refuses": lambda: m.add_private_memory(GPA_A, SIZE, slot=0),
        }[case]
        with pytest.raises(VmmError) as e:
            call()
        if case == "KVM refuses":
            assert isinstance(e.value, KvmError) and e.value.errno == errno.EINVAL
        else:
            assert "overlaps an existing region" in str(e.value)
        del e  # its traceback holds the frames of the failed call
        assert open_fds() == fds and mapping_count() == maps and m.memory.regions == regions
        m.add_memory(GPA_B - SIZE, SIZE)  # nothing of the failed call is bound in KVM
        m.add_memory(GPA_A, SIZE)


def test_private_accounting_counts_from_start_accounting(machine: Machine) -> None:
    """Converter.private_allocated() on a guest_memfd it cannot mmap counts the growth of
    /proc/meminfo Unevictable from start_accounting(), not from the Converter's creation: 32 MiB
    allocated before the baseline do not count, 32 MiB after it do (system-wide counter: 16 MiB
    margin, as test_lifecycle's fallocate test)."""
    require(machine.vm.check_extension(uapi.Cap.GUEST_MEMFD) > 0, "KVM_CAP_GUEST_MEMFD on the VM fd")
    half, margin = 32 << 20, 16 << 20
    conv = Converter(machine.vm, machine.memory)
    region = machine.add_memory(GPA_A, 2 * half, Backing.GUEST_MEMFD, slot=SLOT)
    assert region.gmem is not None and region.gmem.map is None
    region.allocate_private(0, half)
    conv.start_accounting()
    assert conv.private_allocated() <= margin
    region.allocate_private(half, half)
    grown = conv.private_allocated()
    assert abs(grown - half) <= margin, f"{grown >> 20} MiB counted for {half >> 20} MiB allocated after the baseline"


# --- host access to private ranges -------------------------------------------------------------


def test_private_ranges_refuse_host_access(machine: Machine) -> None:
    """With an attribute map (a Converter's), view/read/write/fill/views of a range any of which
    the map says is private raise VmmError naming the private range; shared_view/shared_views reach
    the shared backing on purpose; the shared pages around stay accessible. (The map alone decides:
    this default VM cannot convert, so the map is set as Converter.convert records it; the nested
    kernel runs the same with real conversions, test_private_read_refused_after_conversion.)"""
    mem = machine.memory
    machine.add_memory(GPA_A, 4 * PAGE_SIZE, slot=SLOT)
    mem.write(GPA_A, b"\x11" * 4 * PAGE_SIZE)
    mem.attributes = AttributeMap()
    mem.attributes.set(GPA_A + PAGE_SIZE, GPA_A + 2 * PAGE_SIZE, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    private = re.escape(f"[{GPA_A + PAGE_SIZE:#x}, {GPA_A + 2 * PAGE_SIZE:#x}) is private: the host sees only")
    refused: list[Callable[[], object]] = [
        lambda: mem.read(GPA_A, 4 * PAGE_SIZE),
        lambda: mem.write(GPA_A + 2 * PAGE_SIZE - 1, b"xy"),
        lambda: mem.view(GPA_A + PAGE_SIZE + 8, 8),
        lambda: mem.fill(GPA_A, 4 * PAGE_SIZE, 0),
        lambda: list(mem.views(GPA_A, 4 * PAGE_SIZE)),
    ]
    for call in refused:
        with pytest.raises(VmmError, match=private):
            call()
    assert mem.read(GPA_A, PAGE_SIZE) == b"\x11" * PAGE_SIZE
    assert mem.read(GPA_A + 2 * PAGE_SIZE, 2 * PAGE_SIZE) == b"\x11" * 2 * PAGE_SIZE
    assert bytes(mem.shared_view(GPA_A + PAGE_SIZE, 8)) == b"\x11" * 8
    assert b"".join(bytes(v) for _, v in mem.shared_views(GPA_A, 4 * PAGE_SIZE)) == b"\x11" * 4 * PAGE_SIZE
    mem.attributes.set(GPA_A + PAGE_SIZE, GPA_A + 2 * PAGE_SIZE, 0)
    assert mem.read(GPA_A, 4 * PAGE_SIZE) == b"\x11" * 4 * PAGE_SIZE


@pytest.mark.private_mem
def test_private_read_refused_after_conversion(private_kvm: Kvm) -> None:
    """On a KVM_X86_SW_PROTECTED_VM: after Converter.convert makes one page private, reading or
    writing a range over it through the library is refused with a message naming that page; its
    shared backing, reached on purpose with shared_view, was discarded (zeros); the shared pages
    around read as written; converted back, the whole range reads again (that page: zeros)."""
    with Machine(kvm=private_kvm, vm_type=VmType.SW_PROTECTED) as m:
        conv, mem = m.converter, m.memory
        assert conv is not None
        m.add_private_memory(GPA_A, 4 * PAGE_SIZE)
        mem.write(GPA_A, b"\x11" * 4 * PAGE_SIZE)
        conv.convert(GPA_A + PAGE_SIZE, PAGE_SIZE, True)
        private = re.escape(f"[{GPA_A + PAGE_SIZE:#x}, {GPA_A + 2 * PAGE_SIZE:#x}) is private")
        with pytest.raises(VmmError, match=private):
            mem.read(GPA_A, 4 * PAGE_SIZE)
        with pytest.raises(VmmError, match=private):
            mem.write(GPA_A + PAGE_SIZE, b"\x22")
        assert bytes(mem.shared_view(GPA_A + PAGE_SIZE, PAGE_SIZE)) == bytes(PAGE_SIZE)
        assert mem.read(GPA_A, PAGE_SIZE) == b"\x11" * PAGE_SIZE
        conv.convert(GPA_A + PAGE_SIZE, PAGE_SIZE, False)
        assert mem.read(GPA_A, 4 * PAGE_SIZE) == b"\x11" * PAGE_SIZE + bytes(PAGE_SIZE) + b"\x11" * 2 * PAGE_SIZE


# --- guests converting what vmm placed for them ------------------------------------------------


def map_gpa_range(gpa: int, npages: int, to_private: bool) -> HypercallExit:
    """The exit KVM delivers for the guest's KVM_HC_MAP_GPA_RANGE(gpa, npages, attrs)."""
    attrs = KVM_MAP_GPA_RANGE_ENCRYPTED if to_private else 0
    return HypercallExit(ExitReason.HYPERCALL, KVM_HC_MAP_GPA_RANGE, (gpa, npages, attrs, 0, 0, 0), 0)


def page_of(gpa: int) -> int:
    return gpa & ~(PAGE_SIZE - 1)


def test_load_records_what_it_placed(kvm: Kvm) -> None:
    """Machine.load (long mode, 2 vCPUs) records the image, GDT, IDT, TSS, ucall blocks, page tables and each
    vCPU's stack as disjoint ranges, hands them to PrivateMemoryHandlers, and they cover what the
    vCPUs really use: each RSP's page, CR3's page, RIP's page and the GDT base; the first free GPA
    lies outside them. A memslot added after load gets page tables, which are recorded too."""
    with Machine(kvm=kvm, vcpus=2) as m:
        handlers = m.handlers = PrivateMemoryHandlers(Converter(m.vm, m.memory))
        m.load(load_guest("private_self_convert"))
        assert handlers.protected == m.protected
        spans = sorted((r.start, r.end) for r in m.protected)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), spans

        def what_at(gpa: int) -> str | None:
            return next((r.what for r in m.protected if r.start <= gpa < r.end), None)

        for v in m.vcpus:
            regs, sregs = v.get_regs(), v.get_sregs()
            assert what_at(regs.rsp - 8) == f"vCPU {v.id}'s stack"
            assert what_at(sregs.cr3) == "the page tables"
            assert (what_at(regs.rip) or "").startswith("the guest image") and regs.rip == IMAGE_GPA
            assert what_at(sregs.gdt.base) == "the GDT" and sregs.gdt.base == GDT_GPA
        assert what_at(m.free_gpa) is None and what_at(IMAGE_END - 1) is not None

        before = len(m.protected)
        m.add_memory(DATA_GPA, SIZE)
        [tables] = m.protected[before:]
        assert tables.what == f"the page tables for the memslot at {DATA_GPA:#x}"
        assert tables.start == m.free_gpa and handlers.protected[-1] == tables


def test_real_mode_load_records_image_and_stacks(kvm: Kvm) -> None:
    """In real mode, load records the image and each vCPU's stack below REAL_STACK_TOP."""
    with Machine(kvm=kvm, vcpus=2) as m:
        m.load(load_guest("real_mode"), mode="real")
        got = {r.what: (r.start, r.end) for r in m.protected}
        for i in range(2):
            top = REAL_STACK_TOP - i * REAL_STACK_SIZE
            assert got[f"vCPU {i}'s real-mode stack"] == (top - REAL_STACK_SIZE, top)
        assert [span for what, span in got.items() if what.startswith("the guest image")] == [(IMAGE_GPA, IMAGE_END)]


def test_map_gpa_range_over_what_vmm_placed_stops_the_run(kvm: Kvm) -> None:
    """The handler's decision, on the exits a guest's KVM_HC_MAP_GPA_RANGE produces (this host does
    not forward the hypercall; the nested kernel runs the guest itself,
    test_guest_converting_itself_is_stopped): to private over a stack, the image, the page tables
    or the GDT raises GuestError naming the range asked for, the range hit and what lives there,
    converts nothing and leaves rax unanswered; a range only partly over a stack too. To shared over
    the page tables, and to private over free memory, are answered as usual (here -EINVAL: a
    default VM has no private memory)."""
    with Machine(kvm=kvm, vcpus=2) as m:
        conv = Converter(m.vm, m.memory)
        handlers = m.handlers = PrivateMemoryHandlers(conv)
        m.load(load_guest("private_self_convert"))
        vcpu = m.vcpus[0]
        stack0 = page_of(vcpu.get_regs().rsp - 8)
        cr3 = vcpu.get_sregs().cr3
        last_stack_top = m.free_gpa  # vCPU 1's stack ends where free memory starts
        cases = [
            (stack0, 1, "vCPU 0's stack"),
            (IMAGE_GPA, 1, "the guest image"),
            (page_of(cr3), 1, "the page tables"),
            (GDT_GPA, 1, "the GDT"),
            (last_stack_top - PAGE_SIZE, 2, "vCPU 1's stack"),
        ]
        vcpu.kvm_run.hypercall.ret = 0x5A
        for gpa, npages, what in cases:
            with pytest.raises(GuestError) as e:
                handlers.on_hypercall(vcpu, map_gpa_range(gpa, npages, to_private=True))
            message = str(e.value)
            asked = f"[{gpa:#x}, {gpa + npages * PAGE_SIZE:#x}) private"
            assert message.startswith("vCPU 0: KVM_HC_MAP_GPA_RANGE makes ") and asked in message, message
            assert what in message and "shared" in message, message
            assert vcpu.kvm_run.hypercall.ret == 0x5A  # the guest gets no answer: the run stops
        assert conv.stats.conversions == 0 and handlers.counts.rejected_hypercalls == 0

        assert handlers.on_hypercall(vcpu, map_gpa_range(page_of(cr3), 1, to_private=False)) is True
        assert vcpu.kvm_run.hypercall.ret == -errno.EINVAL & U64
        vcpu.kvm_run.hypercall.ret = 0x5A
        assert handlers.on_hypercall(vcpu, map_gpa_range(m.free_gpa, 1, to_private=True)) is True
        assert vcpu.kvm_run.hypercall.ret == -errno.EINVAL & U64
        assert handlers.counts.rejected_hypercalls == 2


@pytest.mark.private_mem
@pytest.mark.parametrize(
    "target, what",
    [(0, "vCPU 0's stack"), (1, "the guest image"), (2, "the page tables"), (3, None)],
    ids=["stack", "image", "cr3", "data"],
)
def test_guest_converting_itself_is_stopped(private_kvm: Kvm, target: int, what: str | None) -> None:
    """guest/private_self_convert.S asks KVM_HC_MAP_GPA_RANGE to make one page of its own stack,
    image or root page table private: the run stops with a GuestError naming that page and what
    lives there, and nothing was converted (without the check the page turned private would read
    zeros: a triple fault, or a guest running on garbage). The control (3): its data page at
    DATA_GPA, a guest_memfd slot, is converted, the guest gets rax = 0 and finishes."""
    ok, missing = hypercall_exits(private_kvm)
    require(ok, missing)
    with Machine(kvm=private_kvm, vm_type=VmType.SW_PROTECTED) as m:
        conv = m.converter
        assert conv is not None
        m.add_private_memory(DATA_GPA, PAGE_SIZE)
        m.load(load_guest("private_self_convert"), arg=target)
        if what is None:
            assert expect_sync(m.run(timeout=TIMEOUT), 1).args[1] == 0
            expect_done(m.run(timeout=TIMEOUT))
            assert conv.is_private(DATA_GPA) is True and conv.stats.conversions == 1
            return
        with pytest.raises(GuestError) as e:
            m.run(timeout=TIMEOUT)
        message = str(e.value)
        assert "KVM_HC_MAP_GPA_RANGE makes" in message and what in message, message
        assert conv.stats.conversions == 0 and conv.is_private(0, DATA_GPA) is False
