"""A ready-to-run test machine: VM + memory + vCPUs + a loaded guest, the vocabulary of the kernel
selftests' kvm_util (vm_create_with_vcpus, vm_userspace_mem_region_add, vcpu_run, ucall)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from vmm.errors import VcpuStopped, VmmError
from vmm.kvm.exits import Exit, ExitHandlers
from vmm.kvm.system import Kvm
from vmm.kvm.uapi import VmType
from vmm.kvm.vcpu import Vcpu
from vmm.kvm.vm import Vm
from vmm.memory.convert import ConversionPolicy, Converter
from vmm.memory.faults import PrivateMemoryHandlers, ProtectedRange
from vmm.memory.paging import DemandPager, SourceSpec, open_source
from vmm.memory.regions import HUGE_PAGE_SIZE, PAGE_SIZE, Backing, GuestMemory, HugePages, Region

from . import x86
from .image import GuestImage
from .layout import (
    EXC_VECTORS,
    GDT_GPA,
    IDT_GPA,
    IMAGE_END,
    IMAGE_GPA,
    MAX_VCPUS,
    REAL_MAX_VCPUS,
    REAL_STACK_SIZE,
    REAL_STACK_TOP,
    STACK_SIZE,
    SYSTEM_GPA,
    TSS_GPA,
    UCALL_GPA,
    ucall_block,
)
from .runner import Runner, deadline_after, print_guest_output
from .ucall import Ucall
from .x86 import Mode, PageAllocator

DEFAULT_MEM_SIZE = 4 << 20


class Machine:
    """One VM with slot 0 at GPA 0 (image, page tables, stacks) and ``vcpus`` vCPUs."""

    def __init__(
        self,
        *,
        mem_size: int = DEFAULT_MEM_SIZE,
        vcpus: int = 1,
        backing: Backing | str = Backing.SHARED,
        vm_type: VmType | int = VmType.DEFAULT,
        hugepages: HugePages | str = HugePages.NONE,
        handlers: ExitHandlers | None = None,
        output: Callable[[int, str], None] = print_guest_output,
        kvm: Kvm | None = None,
        policy: ConversionPolicy | None = None,
    ) -> None:
        """A VM of ``vm_type``; a private-memory type (e.g. KVM_X86_SW_PROTECTED_VM) also gets a
        Converter (``self.converter``) whose handlers serve memory faults and MAP_GPA_RANGE."""
        # everything made here is closed by self._stack, in reverse order, also when a later step
        # of this constructor fails: nothing leaks and close() needs no "was it made?" checks
        if not 1 <= vcpus <= MAX_VCPUS:
            raise VmmError(f"a machine has 1 to {MAX_VCPUS} vCPUs (one ucall block each), not {vcpus}")
        self._stack = ExitStack()
        try:
            self.kvm = kvm if kvm is not None else self._stack.enter_context(Kvm())
            self.vm: Vm = self._stack.enter_context(self.kvm.create_vm(vm_type))
            self.memory = GuestMemory(self.vm)
            self._stack.callback(self.memory.close)
            self.memory.add(0, mem_size, backing, hugepages=hugepages)
            self.vcpus: list[Vcpu] = []
            for i in range(vcpus):
                self.vcpus.append(self._stack.enter_context(self.vm.create_vcpu(i)))
            self.converter: Converter | None = None
            if handlers is None and vm_type != VmType.DEFAULT:
                self.converter = Converter(self.vm, self.memory, policy)
                handlers = PrivateMemoryHandlers(self.converter)
                PrivateMemoryHandlers.enable(self.vm)
        except BaseException:
            self._stack.close()
            raise
        self.handlers = handlers or ExitHandlers()
        self.runners = [Runner(v, self.memory, self.handlers, output) for v in self.vcpus]
        self.allocator: PageAllocator | None = None
        self.page_tables: x86.PageTables | None = None
        self.mode: Mode | None = None
        self.free_gpa = 0  # first GPA of slot 0 the VMM did not use (rdx at entry)
        self.protected: list[ProtectedRange] = []  # what load() placed in guest memory, by range

    def add_memory(self, gpa: int, size: int, backing: Backing | str = Backing.SHARED, **kw: object) -> Region:
        """Add a memslot (vm_userspace_mem_region_add); identity-mapped if the guest is loaded."""
        region = self.memory.add(gpa, size, backing, **kw)  # type: ignore[arg-type]
        if self.page_tables is not None and self.allocator is not None:
            first = self.allocator.next
            self.page_tables.map(gpa, size)
            self.page_tables.write()
            if self.allocator.next > first:
                what = f"the page tables for the memslot at {gpa:#x}"
                self._protect(ProtectedRange(first, self.allocator.next, what))
        return region

    def add_private_memory(self, gpa: int, size: int, slots: int = 1, **kw: object) -> list[Region]:
        """One guest_memfd of ``size`` bytes split over ``slots`` memslots (memfd + guest_memfd each),
        as private_mem_conversions_test lays out its data. Each region holds its own dup of the
        guest_memfd (find it as ``region.gmem``); this method closes the fd it created, and on a
        failure deletes the slots it had added, so nothing is left bound or open."""
        if size % slots or (size // slots) % PAGE_SIZE:
            raise VmmError(f"{size:#x} bytes do not split into {slots} page-aligned memslots")
        per = size // slots
        regions: list[Region] = []
        with self.vm.create_guest_memfd(size, 0) as gmem:
            try:
                for i in range(slots):
                    regions.append(
                        self.add_memory(gpa + i * per, per, Backing.GUEST_MEMFD, gmem=gmem, gmem_offset=i * per, **kw)
                    )
            except BaseException:
                for r in reversed(regions):
                    self.memory.delete(r.slot)
                raise
        return regions

    def add_demand_paged_memory(
        self,
        gpa: int,
        size: int,
        source: SourceSpec,
        **opts: Any,
    ) -> DemandPager:
        """A memslot (memfd, no guest_memfd) at ``gpa`` demand-paged from ``source`` (vmm.memory.paging;
        ``opts``: fetch, prefetch, guard). Needs a SW_PROTECTED machine; the pager closes with it."""
        if self.converter is None or not isinstance(self.handlers, PrivateMemoryHandlers):
            raise VmmError("demand paging needs a KVM_X86_SW_PROTECTED_VM machine with vmm's private-memory handlers")
        self.add_memory(gpa, size, Backing.SHARED, **opts.pop("memory", {}))
        pager = DemandPager(self.converter, gpa, size, open_source(source), **opts)
        self._stack.callback(pager.source.close)
        self._stack.callback(pager.close)
        self.handlers.pagers.append(pager)
        return pager

    def load(
        self, image: GuestImage | bytes, mode: Mode | str | None = None, arg: int = 0, page_size: int = HUGE_PAGE_SIZE
    ) -> None:
        """Copy the image to IMAGE_GPA and put every vCPU at its entry in ``mode`` (default: the
        image's), with rdi=vCPU id, rsi=#vCPUs, rdx=first free GPA, rcx=arg, r8=end of slot 0.
        Records what it placed where in ``protected`` (image, GDT/TSS, page tables, stacks) and
        hands those ranges to PrivateMemoryHandlers, which refuse to make them private."""
        data = image.binary if isinstance(image, GuestImage) else image
        mode = Mode(mode or (image.mode if isinstance(image, GuestImage) else Mode.LONG))
        if isinstance(image, GuestImage):
            for r in self.runners:
                r.source = image.source
        self.memory.write(IMAGE_GPA, data)
        slot0_end = self.memory.region_at(0).end
        self.mode = mode
        self.protected = []
        if isinstance(self.handlers, PrivateMemoryHandlers):
            self.handlers.protected = []
        what = f"the guest image ({len(data)} bytes at {IMAGE_GPA:#x}, then its .bss up to {IMAGE_END:#x})"
        self._protect(ProtectedRange(IMAGE_GPA, IMAGE_END, what))
        blocks = ucall_block(len(self.vcpus))
        self._protect(ProtectedRange(UCALL_GPA, blocks, "the vCPUs' ucall blocks"))
        # the image's exception stubs (vmm_exceptions.h), when built for this mode: vectors 0-31
        # report through UCALL_EXCEPTION instead of ending in a silent triple fault
        stubs = x86.exception_stubs(data)
        bits = 16 if mode is Mode.REAL else 64
        stubs_gpa = stubs[0] if stubs is not None and stubs[1] == bits else None
        idt: tuple[int, int] | None = None
        if mode is Mode.REAL:
            if len(self.vcpus) > REAL_MAX_VCPUS:
                raise VmmError(
                    f"a real-mode guest has at most {REAL_MAX_VCPUS} vCPUs (their stacks below {REAL_STACK_TOP:#x} "
                    f"would overlap the ucall blocks from {UCALL_GPA:#x}), not {len(self.vcpus)}"
                )
            if stubs_gpa is not None:
                x86.write_ivt(self.memory, stubs_gpa)
                self._protect(ProtectedRange(0, EXC_VECTORS * 4, "the real-mode IVT"))
            for v in self.vcpus:
                top = REAL_STACK_TOP - v.id * REAL_STACK_SIZE
                self._protect(ProtectedRange(top - REAL_STACK_SIZE, top, f"vCPU {v.id}'s real-mode stack"))
                x86.enter_real_mode(
                    v, IMAGE_GPA, top, (v.id, len(self.vcpus), IMAGE_END, arg, slot0_end), ucall_block(v.id)
                )
            return
        self.allocator = PageAllocator(self.memory)
        self.page_tables = x86.setup_long_mode_tables(
            self.memory, self.allocator, page_size, [(r.gpa, r.size) for r in self.memory.regions]
        )
        tables_end = self.allocator.next
        stacks = [self.allocator.alloc(STACK_SIZE) + STACK_SIZE for _ in self.vcpus]
        free = self.free_gpa = self.allocator.next
        # the GDT's page holds the IDT in its second half (IDT_GPA)
        self._protect(ProtectedRange(GDT_GPA, IDT_GPA, "the GDT"))
        self._protect(ProtectedRange(TSS_GPA, TSS_GPA + PAGE_SIZE, "the TSS"))
        if stubs_gpa is not None:
            idt = x86.write_idt(self.memory, stubs_gpa)
            self._protect(ProtectedRange(IDT_GPA, IDT_GPA + EXC_VECTORS * 16, "the IDT"))
        self._protect(ProtectedRange(SYSTEM_GPA, tables_end, "the page tables"))
        for v, top in zip(self.vcpus, stacks):
            self._protect(ProtectedRange(top - STACK_SIZE, top, f"vCPU {v.id}'s stack"))
            v.set_cpuid2(self.kvm.supported_cpuid)
            entry_args = (v.id, len(self.vcpus), free, arg, slot0_end)
            x86.enter_long_mode(v, self.page_tables.root, IMAGE_GPA, top, entry_args, ucall_block(v.id), idt)

    def setup_mce(self, banks: int = x86.MCE_BANKS) -> None:
        """Give every vCPU ``banks`` machine-check banks (KVM_X86_SETUP_MCE, with the MCG_CTL_P and
        MCG_SER_P KVM offers), as QEMU does for a CPU with MCE and MCA; inject with inject_mce()."""
        cap = x86.mcg_cap(banks, self.kvm.mce_cap_supported())
        for v in self.vcpus:
            v.setup_mce(cap)

    def inject_mce(self, vcpu: int, gpa: int, action_required: bool = True, bank: int = x86.MCE_BANKS - 1) -> None:
        """Route a memory error at ``gpa`` into the guest as #MC on its next entry (KVM_X86_SET_MCE
        after setup_mce()); the guest needs CR4.MCE set, or KVM makes it a triple fault."""
        self.vcpus[vcpu].set_mce(x86.machine_check(gpa, action_required, bank))

    def _protect(self, r: ProtectedRange) -> None:
        """Record guest memory vmm placed something in; private-memory handlers refuse to convert it."""
        self.protected.append(r)
        if isinstance(self.handlers, PrivateMemoryHandlers):
            self.handlers.protect(*r)

    def run(self, vcpu: int = 0, timeout: float | None = None) -> Ucall | Exit:
        """Run one vCPU to its next SYNC/DONE ucall or HLT (vcpu_run + get_ucall); ``timeout``
        (seconds, finite and > 0, or None) bounds this one call."""
        return self.runners[vcpu].run(timeout)

    def run_all(
        self, timeout: float | None = None, on_sync: Callable[[Ucall], None] | None = None
    ) -> list[Ucall | Exit]:
        """Run every vCPU on its own thread to DONE or HLT. ``timeout`` (seconds, finite and > 0, or
        None) bounds the whole run: all vCPUs together, however many SYNCs they make (each goes to
        ``on_sync``, called on that vCPU's thread). When a vCPU fails, the others are stopped at once
        and the first failure is re-raised (not the VcpuStopped of the vCPUs it stopped)."""
        runners = self.runners
        deadline = deadline_after(timeout)
        results: list[Ucall | Exit | None] = [None] * len(runners)
        errors: list[BaseException] = []

        def stop_others(failed: Runner | None, why: str) -> None:
            for r in runners:
                if r is not failed:
                    r.stop(why)

        def work(i: int) -> None:
            try:
                results[i] = runners[i]._until_done(on_sync)
            except BaseException as e:  # reported below
                errors.append(e)
                if not _is_kicked(e):
                    stop_others(runners[i], f"stopped because vCPU {i} failed first")

        # every runner is set up before any vCPU runs: a stop can never be undone by a late start
        for r in runners:
            r._begin(timeout, deadline)
        threads: list[threading.Thread] = []
        try:
            for i in range(1, len(runners)):
                threads.append(threading.Thread(target=work, args=(i,), name=f"vcpu{i}"))
                threads[-1].start()
            work(0)
            for t in threads:
                t.join()
        except BaseException:  # e.g. Ctrl-C in join(), or no thread could be started: stop them all
            stop_others(None, "stopped: the run was interrupted")
            for t in threads:
                if t.ident is not None:
                    t.join()
            raise
        finally:
            for r in runners:
                r._finish()
        if errors:
            first = next((e for e in errors if not _is_kicked(e)), errors[0])
            errors.clear()  # no cycle exception -> traceback -> this frame -> errors: vCPU maps must unmap
            try:
                raise first
            finally:
                first = None  # type: ignore[assignment]
        return results  # type: ignore[return-value]

    def close(self) -> None:
        """Close vCPUs, memory, guest_memfds, the VM and (if we opened it) /dev/kvm, newest first."""
        self._stack.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_kicked(e: BaseException) -> bool:
    """A vCPU stopped because another one failed first (not the root cause)."""
    return isinstance(e, VcpuStopped)
