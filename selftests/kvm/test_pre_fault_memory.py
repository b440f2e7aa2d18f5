"""Port of tools/testing/selftests/kvm/pre_fault_memory_test.c (6.12, and 7.3's racing slot
deletion): KVM_PRE_FAULT_MEMORY.

A 2M+4K memslot sits near the top of the guest physical address space (the kernel test's
placement, vm_compute_max_gfn()). The host pre-faults its first 2M (all done), its last page plus
one page past the slot (one page done, then ENOENT: no memslot there), and one page past the slot
(nothing done, ENOENT). Each KVM_PRE_FAULT_MEMORY call must shrink the range exactly when it
succeeds. Then the guest (guest/pre_fault_memory.S) reads every page and checks what it finds.
Variants as in the kernel's main(): default VM; KVM_X86_SW_PROTECTED_VM with shared memory; the
same with the range private (guest_memfd slot, private attributes).

7.3's version deletes (and later re-creates) the slot from another thread while each pre-fault
runs: test_pre_fault_memory_delete_slot.

Beyond the kernel test: overlapping and repeated ranges, argument validation (EINVAL), a private
range whose memslot has no guest_memfd (EFAULT), that pre-faulting a private range allocates its
guest_memfd pages, and that the guest's stores land where the host expects them."""

from __future__ import annotations

import ctypes
import errno
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from vmm import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    Backing,
    Cap,
    ExitHandlers,
    Kvm,
    Machine,
    Ucall,
    UcallCmd,
    Vcpu,
    VmType,
    load_guest,
)
from vmm.kvm import uapi
from vmm.kvm.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE
from vmm.tools.pytest_plugin import require, require_private_mem

from helpers import kernel_version

TEST_SIZE = HUGE_PAGE_SIZE + PAGE_SIZE
TEST_NPAGES = TEST_SIZE // PAGE_SIZE
TEST_SLOT = 10
TIMEOUT = 120.0
IDENTITY_MAP_LIMIT = 1 << 47  # vmm's guests identity-map GPAs, so the VA must stay canonical

VARIANTS = [  # main(): test_pre_fault_memory(0, false), (SW_PROTECTED, false), (SW_PROTECTED, true)
    pytest.param(VmType.DEFAULT, False, id="default"),
    pytest.param(VmType.SW_PROTECTED, False, id="sw_protected-shared", marks=pytest.mark.private_mem),
    pytest.param(VmType.SW_PROTECTED, True, id="sw_protected-private", marks=pytest.mark.private_mem),
]


def cpuid(kvm: Kvm, function: int, index: int = 0) -> uapi.kvm_cpuid_entry2 | None:
    """An entry of KVM_GET_SUPPORTED_CPUID (what kvm_cpu_property() reads in the selftests)."""
    buf = kvm.supported_cpuid
    header = ctypes.sizeof(uapi.kvm_cpuid2)
    nent = uapi.kvm_cpuid2.from_buffer_copy(buf[:header]).nent
    entries = (uapi.kvm_cpuid_entry2 * nent).from_buffer_copy(buf[header:])
    return next((e for e in entries if e.function == function and e.index == index), None)


def region_gpa(kvm: Kvm) -> int:
    """guest_test_phys_mem: (max_gfn - TEST_NPAGES) pages, aligned down to 2M, where max_gfn is
    the last gfn below guest MAXPHYADDR and below AMD's HyperTransport hole (vm_compute_max_gfn(),
    with every CPU property read from KVM's supported CPUID); capped for vmm's identity map."""
    leaf = cpuid(kvm, 0x80000008)
    pa_bits = leaf.eax & 0xFF if leaf else 36
    guest_pa_bits = ((leaf.eax >> 16) & 0xFF if leaf else 0) or pa_bits
    max_gfn = (1 << (guest_pa_bits - 12)) - 1
    vendor = cpuid(kvm, 0)
    is_amd = vendor is not None and (vendor.ebx, vendor.edx, vendor.ecx) in (
        (0x68747541, 0x69746E65, 0x444D4163),  # AuthenticAMD
        (0x6F677948, 0x6E65476E, 0x656E6975),  # HygonGenuine
    )
    if is_amd and pa_bits >= 40:
        ht_pages = 12 << (30 - 12)  # 12 GiB
        f1 = cpuid(kvm, 1)
        family = (f1.eax >> 8) & 0xF if f1 else 0
        if family == 0xF:
            family += (f1.eax >> 20) & 0xFF
        if family < 0x17:
            ht_gfn = (1 << 28) - ht_pages  # just below 1T
        else:
            max_pfn = (1 << (pa_bits - 12)) - 1
            sme = cpuid(kvm, 0x8000001F)
            if sme is not None:
                max_pfn >>= (sme.ebx >> 6) & 0x3F
            ht_gfn = max_pfn - ht_pages
        max_gfn = min(max_gfn, ht_gfn - 1)
    gpa = (max_gfn - TEST_NPAGES) * PAGE_SIZE
    gpa = min(gpa, IDENTITY_MAP_LIMIT - HUGE_PAGE_SIZE - TEST_SIZE)
    return gpa - gpa % HUGE_PAGE_SIZE


def pre_fault_once(vcpu: Vcpu, req: uapi.kvm_pre_fault_memory, context: str) -> int:
    """One KVM_PRE_FAULT_MEMORY; returns its errno (0: success). The kernel test's invariant: the
    range shrinks if and only if the call succeeds."""
    prev = req.size
    try:
        vcpu.ioctl(uapi.KVM_PRE_FAULT_MEMORY, req)
        err = 0
    except OSError as e:
        err = e.errno or -1
    assert (req.size < prev) != (err != 0), (
        f"{context}: {'not ' if err else ''}expecting range.size to change on {'failure' if err else 'success'} "
        f"({errno.errorcode.get(err, err)}, {prev:#x} -> {req.size:#x})"
    )
    return err


def pre_fault_memory(vcpu: Vcpu, gpa: int, size: int, left: int, expect: int = errno.ENOENT) -> None:
    """The kernel's pre_fault_memory(): KVM_PRE_FAULT_MEMORY until done or failed (retrying EINTR).
    Every call must shrink the range if and only if it succeeds; in the end ``left`` bytes remain,
    and the last call succeeded when nothing is left, else failed with ``expect`` (the kernel:
    ENOENT, no memslot means RET_PF_EMULATE)."""
    req = uapi.kvm_pre_fault_memory(gpa=gpa, size=size, flags=0)
    while True:
        err = pre_fault_once(vcpu, req, f"[{gpa:#x}, +{size:#x})")
        if not (req.size if err == 0 else err == errno.EINTR):
            break
    assert req.size == left, f"[{gpa:#x}, +{size:#x}): completed with {req.size:#x} bytes left, expected {left:#x}"
    if left == 0:
        assert err == 0, f"[{gpa:#x}, +{size:#x}): {errno.errorcode.get(err, err)}"
    else:
        assert err == expect, (
            f"[{gpa:#x}, +{size:#x}): expected {errno.errorcode[expect]}, got {errno.errorcode.get(err, err)}"
        )


def expect_einval(vcpu: Vcpu, gpa: int, size: int, flags: int = 0) -> None:
    """kvm_vcpu_pre_fault_memory()'s argument checks: EINVAL, range untouched."""
    req = uapi.kvm_pre_fault_memory(gpa=gpa, size=size, flags=flags)
    with pytest.raises(OSError) as e:
        vcpu.ioctl(uapi.KVM_PRE_FAULT_MEMORY, req)
    assert e.value.errno == errno.EINVAL, f"gpa={gpa:#x} size={size:#x} flags={flags:#x}: {e.value}"
    assert (req.gpa, req.size) == (gpa, size)


@contextmanager
def pre_fault_machine(
    kvm: Kvm, vm_type: VmType, private: bool, backing: Backing | None = None
) -> Iterator[tuple[Machine, int]]:
    """__test_pre_fault_memory()'s VM: one vCPU, slot 10 of TEST_SIZE at the top of guest physical
    memory (guest_memfd-bound if ``private``), identity-mapped, guest loaded. Yields it and the GPA."""
    if vm_type != VmType.DEFAULT:
        require_private_mem(kvm)
    handlers = ExitHandlers() if vm_type == VmType.DEFAULT else None
    with Machine(kvm=kvm, vm_type=vm_type, handlers=handlers) as m:
        require(m.vm.check_extension(Cap.PRE_FAULT_MEMORY) > 0, "KVM_CAP_PRE_FAULT_MEMORY")
        gpa = region_gpa(kvm)
        backing = backing or (Backing.GUEST_MEMFD if private else Backing.SHARED)
        m.add_memory(gpa, TEST_SIZE, backing, slot=TEST_SLOT)
        m.load(load_guest("pre_fault_memory"), arg=gpa | int(private))
        yield m, gpa


@pytest.mark.parametrize("vm_type, private", VARIANTS)
def test_pre_fault_memory(kvm: Kvm, vm_type: VmType, private: bool) -> None:
    """pre_fault_memory_test.c: __test_pre_fault_memory(vm_type, private). [gpa, +2M) is fully
    pre-faulted, [gpa+2M, +8K) stops after 4K with ENOENT, [gpa+TEST_SIZE, +4K) does nothing with
    ENOENT; then the guest reads every page and finds the host's pattern (shared) or zeros
    (private). Also: for a private range the guest_memfd pages exist after pre-faulting (the
    Unevictable growth vmm uses to measure guest_memfd), and the guest's stores reach the host's
    view (shared) or stay out of it (private). Kernel cases and those extra checks in one test, so
    not marked beyond_kernel."""
    with pre_fault_machine(kvm, vm_type, private) as (m, gpa):
        if private:
            assert m.converter is not None
            m.converter.convert(gpa, TEST_SIZE, True)  # vm_mem_set_private()
            allocated = m.converter.private_allocated()
        else:
            for page in range(gpa, gpa + TEST_SIZE, PAGE_SIZE):
                m.memory.write(page, page.to_bytes(8, "little"))
        vcpu = m.vcpus[0]
        pre_fault_memory(vcpu, gpa, HUGE_PAGE_SIZE, 0)
        pre_fault_memory(vcpu, gpa + HUGE_PAGE_SIZE, PAGE_SIZE * 2, PAGE_SIZE)
        pre_fault_memory(vcpu, gpa + TEST_SIZE, PAGE_SIZE, PAGE_SIZE)
        if private:
            # Unevictable moves when a CPU's LRU batch drains, so a few dozen pages may still be
            # missing here; without the pre-fault nothing at all would have been allocated yet.
            grown = m.converter.private_allocated() - allocated
            assert grown >= TEST_SIZE // 2, f"pre-faulting {TEST_SIZE:#x} private bytes allocated only {grown:#x}"

        result = m.run(timeout=TIMEOUT)
        assert isinstance(result, Ucall) and result.cmd == UcallCmd.DONE, f"got {result}"
        for page in range(gpa, gpa + TEST_SIZE, PAGE_SIZE):
            seen = int.from_bytes(m.memory.shared_view(page, 8), "little")  # a private page: its shared copy
            want = 0 if private else page ^ (1 << 64) - 1
            assert seen == want, f"host reads {seen:#x} at {page:#x}, expected {want:#x}"


@pytest.mark.beyond_kernel
@pytest.mark.parametrize("vm_type, private", VARIANTS)
def test_pre_fault_memory_ranges(kvm: Kvm, vm_type: VmType, private: bool) -> None:
    """Beyond pre_fault_memory_test.c (same VM): ranges overlapping what is already mapped, or
    repeating it, succeed again; one crossing the slot's end stops exactly there (ENOENT); one
    starting in the gap below the slot does nothing (ENOENT); flags, unaligned gpa or size, size 0
    and a wrapping range are EINVAL and leave the range untouched; then the guest runs as before."""
    with pre_fault_machine(kvm, vm_type, private) as (m, gpa):
        if private:
            assert m.converter is not None
            m.converter.convert(gpa, TEST_SIZE, True)
        else:
            for page in range(gpa, gpa + TEST_SIZE, PAGE_SIZE):
                m.memory.write(page, page.to_bytes(8, "little"))
        vcpu = m.vcpus[0]
        pre_fault_memory(vcpu, gpa + PAGE_SIZE, 4 * PAGE_SIZE, 0)  # part of the first 2M
        pre_fault_memory(vcpu, gpa, TEST_SIZE, 0)  # all of it, overlapping the above
        pre_fault_memory(vcpu, gpa, TEST_SIZE, 0)  # again: already mapped is success
        pre_fault_memory(vcpu, gpa + HUGE_PAGE_SIZE - 2 * PAGE_SIZE, 8 * PAGE_SIZE, 5 * PAGE_SIZE)
        pre_fault_memory(vcpu, gpa - HUGE_PAGE_SIZE, 2 * HUGE_PAGE_SIZE, 2 * HUGE_PAGE_SIZE)
        expect_einval(vcpu, gpa, PAGE_SIZE, flags=1)
        expect_einval(vcpu, gpa + 8, PAGE_SIZE)
        expect_einval(vcpu, gpa, PAGE_SIZE + 8)
        expect_einval(vcpu, gpa, 0)
        expect_einval(vcpu, (1 << 64) - PAGE_SIZE, 2 * PAGE_SIZE)
        result = m.run(timeout=TIMEOUT)
        assert isinstance(result, Ucall) and result.cmd == UcallCmd.DONE, f"got {result}"


@pytest.mark.beyond_kernel
@pytest.mark.private_mem
def test_pre_fault_private_without_guest_memfd(kvm: Kvm) -> None:
    """Beyond pre_fault_memory_test.c (cf. private_mem_kvm_exits_test's memslot_not_private): on a
    SW_PROTECTED VM, a private range whose memslot has no guest_memfd cannot be pre-faulted:
    KVM_PRE_FAULT_MEMORY fails with EFAULT having done nothing (kvm_faultin_pfn_private())."""
    with pre_fault_machine(kvm, VmType.SW_PROTECTED, False) as (m, gpa):
        m.vm.set_memory_attributes(gpa, TEST_SIZE, KVM_MEMORY_ATTRIBUTE_PRIVATE)
        pre_fault_memory(m.vcpus[0], gpa, PAGE_SIZE, PAGE_SIZE, expect=errno.EFAULT)
        pre_fault_memory(m.vcpus[0], gpa + HUGE_PAGE_SIZE, PAGE_SIZE, PAGE_SIZE, expect=errno.EFAULT)


class DeleteSlotWorker(threading.Thread):
    """7.3's delete_slot_worker(): once the pre-faulting thread is ready, delete TEST_SLOT; when told
    to, re-create it (same GPA and size, a fresh backing: a new guest_memfd if ``private``)."""

    def __init__(self, m: Machine, gpa: int, private: bool) -> None:
        super().__init__(name="delete_slot_worker", daemon=True)
        self.m, self.gpa, self.private = m, gpa, private
        self.worker_ready = threading.Event()
        self.prefault_ready = threading.Event()
        self.recreate_slot = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.worker_ready.set()
            self.prefault_ready.wait()
            self.m.memory.delete(TEST_SLOT)  # vm_mem_region_delete()
            self.recreate_slot.wait()
            backing = Backing.GUEST_MEMFD if self.private else Backing.SHARED
            self.m.add_memory(self.gpa, TEST_SIZE, backing, slot=TEST_SLOT)
        except BaseException as e:  # handed to the test thread by join_checked()
            self.error = e
            self.worker_ready.set()

    def join_checked(self) -> None:
        self.join(TIMEOUT)
        assert not self.is_alive(), "delete_slot_worker did not finish: the memslot deletion never completed"
        if self.error is not None:
            raise self.error


def pre_fault_memory_racing_delete(m: Machine, gpa: int, offset: int, size: int, left: int, private: bool) -> list[str]:
    """7.3's pre_fault_memory(vcpu, base_gpa, offset, size, expected_left, private): while a
    DeleteSlotWorker deletes the slot, KVM_PRE_FAULT_MEMORY [base+offset, +size) until done or
    failed. Every call must shrink the range if and only if it succeeded; EINTR is retried; after
    the first answer the slot is re-created (and the worker joined), and a range not yet done is
    pre-faulted again, so the final answer is stable: ``left`` bytes remain, and the last call
    succeeded when nothing is left, else failed with ENOENT (no memslot there: RET_PF_EMULATE).
    EAGAIN (the slot was being deleted, 6.17+) is thus fine only before the slot was re-created.
    Returns the errno names seen, in order ('0' for success), for the caller to report."""
    vcpu = m.vcpus[0]
    req = uapi.kvm_pre_fault_memory(gpa=gpa + offset, size=size, flags=0)
    worker = DeleteSlotWorker(m, gpa, private)
    worker.start()
    try:
        worker.worker_ready.wait()
        worker.prefault_ready.set()
        recreated = False
        seen: list[str] = []
        while True:
            err = pre_fault_once(vcpu, req, f"answers so far {seen}")
            seen.append(errno.errorcode.get(err, str(err)) if err else "0")
            if err == errno.EINTR:  # interrupted by an unrelated signal: retry at once
                continue
            if not recreated:
                worker.recreate_slot.set()
                worker.join_checked()
                recreated = True
                if req.size:  # KVM refuses size 0, so retry only what is left
                    continue
            if not req.size or err:
                break
    finally:
        worker.prefault_ready.set()
        worker.recreate_slot.set()
        worker.join(TIMEOUT)
    assert req.size == left, f"Completed with {req.size:#x} bytes left, expected {left:#x} (answers {seen})"
    if left == 0:
        assert err == 0, f"KVM_PRE_FAULT_MEMORY failed with {seen[-1]} (answers {seen})"
    else:
        assert err == errno.ENOENT, f"KVM_PRE_FAULT_MEMORY: expected ENOENT, got {seen[-1]} (answers {seen})"
    return seen


@pytest.mark.parametrize("vm_type, private", VARIANTS)
def test_pre_fault_memory_delete_slot(kvm: Kvm, vm_type: VmType, private: bool) -> None:
    """pre_fault_memory_test.c (7.3): __test_pre_fault_memory(vm_type, private), whose
    pre_fault_memory() races each pre-fault against delete_slot_worker() deleting slot 10 (then
    re-creating it: fresh memory, a fresh guest_memfd when private; the private attributes stay, as
    they are per VM). The three ranges and outcomes are 6.12's ([gpa, +2M) all done; [gpa+2M, +8K)
    4K left, ENOENT; [gpa+TEST_SIZE, +4K) 4K left, ENOENT), reached after the slot came back; each
    call shrinks the range iff it succeeds. Then the guest reads every page. Beyond the C test's
    guest (which only reads): before the race the slot holds a poison pattern, after it the host
    writes each page's GPA into the re-created slot and the guest must read exactly that (shared) or
    zeros (private), so a mapping left over from the deleted slot would fail the guest's assert.
    Gate, no capability tells: before Linux 6.17 ("KVM: x86/mmu: Return -EAGAIN if userspace
    deletes/moves memslot during prefault") a pre-fault that meets the slot being deleted retries
    while holding kvm->srcu, which the deletion waits for: the two deadlock (6.12 has this)."""
    with pre_fault_machine(kvm, vm_type, private) as (m, gpa):
        require(
            kernel_version() >= (6, 17),
            "KVM_PRE_FAULT_MEMORY failing with EAGAIN on a memslot being deleted (Linux 6.17+; "
            "before it the pre-fault and the deletion deadlock)",
        )
        if private:
            assert m.converter is not None
            m.converter.convert(gpa, TEST_SIZE, True)  # vm_mem_set_private()
        else:
            for page in range(gpa, gpa + TEST_SIZE, PAGE_SIZE):
                m.memory.write(page, (0xDEAD0000DEAD0000 | page >> 12).to_bytes(8, "little"))
        answers = [
            pre_fault_memory_racing_delete(m, gpa, 0, HUGE_PAGE_SIZE, 0, private),
            pre_fault_memory_racing_delete(m, gpa, HUGE_PAGE_SIZE, PAGE_SIZE * 2, PAGE_SIZE, private),
            pre_fault_memory_racing_delete(m, gpa, TEST_SIZE, PAGE_SIZE, PAGE_SIZE, private),
        ]
        print(f"KVM_PRE_FAULT_MEMORY answers per range: {answers}")
        if not private:
            for page in range(gpa, gpa + TEST_SIZE, PAGE_SIZE):
                m.memory.write(page, page.to_bytes(8, "little"))
        result = m.run(timeout=TIMEOUT)
        assert isinstance(result, Ucall) and result.cmd == UcallCmd.DONE, f"got {result}"
