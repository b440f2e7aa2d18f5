"""Exit handlers for private memory: KVM_EXIT_HYPERCALL(KVM_HC_MAP_GPA_RANGE) converts as the guest
asks, except ranges vmm set up for the guest itself (image, page tables, stacks: ``protected``),
which stop the run with a GuestError that names them; KVM_EXIT_MEMORY_FAULT re-enters or converts
depending on the VM type (on_memory_fault)."""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from vmm.errors import ConversionError, GuestError, MemoryFaultError, VmmError
from vmm.kvm.exits import ExitHandlers, HypercallExit, MemoryFaultExit
from vmm.kvm.uapi import KVM_HC_MAP_GPA_RANGE, KVM_MAP_GPA_RANGE_ENCRYPTED, Cap, VmType

from .convert import ConversionPolicy, Converter
from .regions import PAGE_SIZE

if TYPE_CHECKING:
    from vmm.kvm.vcpu import Vcpu
    from vmm.kvm.vm import Vm

    from .paging import DemandPager

MAX_REPEATS = 3  # the same fault this many times with no conversion in between is a bug, not a race


class ProtectedRange(NamedTuple):
    """Guest memory vmm set up for the guest to run from (image, GDT, page tables, a stack): it is
    shared memory, and the guest converting it to private would lose it (zeros, or a fault)."""

    start: int
    end: int
    what: str


@dataclass
class PrivateExitCounts:
    """What the handlers saw: faults (and the stale ones among them), hypercalls, refusals."""

    memory_faults: int = 0
    stale_faults: int = 0
    hypercalls: int = 0
    rejected_hypercalls: int = 0


class PrivateMemoryHandlers(ExitHandlers):
    """Converts on the guest's behalf; one instance serves every vCPU of the VM."""

    def __init__(self, converter: Converter) -> None:
        self.converter = converter
        self.counts = PrivateExitCounts()
        self.lock = threading.Lock()  # conversions from several vCPU threads are serialised
        self._last_fault: dict[int, tuple[MemoryFaultExit, int, int]] = {}  # (fault, repeats, conversions then)
        # True where a fault is never a conversion request (see on_memory_fault)
        self.attributes_decide = converter.vm.type == VmType.SW_PROTECTED
        self.policy_for: dict[int, ConversionPolicy] = {}  # per-vCPU overrides of the converter's policy
        self.protected: list[ProtectedRange] = []  # what Machine.load placed; never converted to private
        self.pagers: list[DemandPager] = []  # demand-paged ranges (vmm.memory.paging): their faults are page-ins

    def protect(self, start: int, end: int, what: str) -> None:
        """Refuse guest requests to make [start, end) private: ``what`` lives there (e.g. "page tables")."""
        self.protected.append(ProtectedRange(start, end, what))

    def _refuse_protected(self, vcpu: Vcpu, gpa: int, size: int, why: str) -> None:
        """GuestError when [gpa, gpa+size), about to turn private for ``why``, covers a protected range."""
        end = gpa + size
        for r in self.protected:
            if r.start < end and gpa < r.end:
                raise GuestError(
                    f"vCPU {vcpu.id}: {why} makes [{gpa:#x}, {end:#x}) private, which covers "
                    f"[{r.start:#x}, {r.end:#x}), {r.what}: vmm set that up as shared memory and the "
                    "guest cannot run from it once private (its shared copy is discarded), so the run stops"
                )

    @staticmethod
    def enable(vm: Vm) -> None:
        """Ask KVM to forward KVM_HC_MAP_GPA_RANGE to userspace (KVM_CAP_EXIT_HYPERCALL bit 12)."""
        vm.enable_cap(Cap.EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)

    def on_memory_fault(self, vcpu: Vcpu, exit: MemoryFaultExit) -> bool:
        """KVM_EXIT_MEMORY_FAULT: what it means depends on the VM type.

        KVM_X86_SW_PROTECTED_VM (the only private-memory type vmm can create here): KVM takes
        private-vs-shared from the attributes alone, so the fault's flags are the attributes when
        the access began, never a request. If vmm's map differs now, a conversion raced the access
        and converting "back" would undo it (seen: 10 of 400 racing host conversions reverted); if
        they agree, no conversion can help (no guest_memfd behind a private gfn, or none behind the
        slot). Either way: re-enter, and raise MemoryFaultError when the same fault repeats with no
        conversion in between.

        Other types (SEV-SNP, TDX: the guest's page tables choose private or shared): convert the
        range to what the fault asks, as QEMU's kvm_convert_memory does, unless it would make a
        protected range private (GuestError). That branch needs such a VM (or
        ``attributes_decide`` set False by a caller that gives faults that meaning).

        A fault in a demand-paged range (``pagers``; PRIVATE there means "not present", in a
        memslot without guest_memfd) is a page-in: the pager fetches the unit and converts it to
        shared, with its own lock so vCPUs fault on different units in parallel, and its own
        stale-fault rule (a fault on a range present by now re-enters, bounded)."""
        for pager in self.pagers:
            if pager.owns(exit.gpa):
                return pager.on_fault(vcpu, exit)
        conv = self.converter
        with self.lock:
            self.counts.memory_faults += 1
            want = exit.private
            if conv.is_private(exit.gpa, exit.size) is want or self.attributes_decide:
                # our map already says what the guest wants (or the attributes alone decide): a
                # conversion raced this access and KVM re-checked the attributes; just re-enter
                self.counts.stale_faults += 1
                return self._progress(vcpu, exit)
            if want:
                self._refuse_protected(vcpu, exit.gpa, exit.size, str(exit))
            try:
                conv.convert(exit.gpa, exit.size, want, self.policy_for.get(vcpu.id))
            except ConversionError as e:
                raise MemoryFaultError(
                    f"vCPU {vcpu.id}: cannot resolve {exit}: {e}\n  map: {conv.map_state(exit.gpa)}"
                ) from None
            self._last_fault.pop(vcpu.id, None)
            return True

    def _progress(self, vcpu: Vcpu, exit: MemoryFaultExit) -> bool:
        last, n, then = self._last_fault.get(vcpu.id, (None, 0, -1))
        now = self.converter.stats.conversions
        n = n + 1 if last == exit and then == now else 1  # a conversion in between: a new race
        self._last_fault[vcpu.id] = (exit, n, now)
        if n >= MAX_REPEATS:
            raise MemoryFaultError(
                f"vCPU {vcpu.id}: {exit} repeats {n} times with no conversion in between "
                f"({self._memslot(exit.gpa)})\n  map: {self.converter.map_state(exit.gpa)}"
            )
        return True

    def _memslot(self, gpa: int) -> str:
        try:
            r = self.converter.memory.region_at(gpa)
        except VmmError:
            return "no memslot there"
        return f"memslot {r.slot} at {r.gpa:#x}, {'with' if r.gmem is not None else 'without'} guest_memfd"

    def on_hypercall(self, vcpu: Vcpu, exit: HypercallExit) -> bool:
        """KVM_HC_MAP_GPA_RANGE(gpa, npages, attrs): convert as the guest asks and answer in RAX: 0,
        or -errno when the range cannot be converted (the VM keeps running). A request to make a
        protected range private raises GuestError instead: the guest would lose its own code,
        page tables or stack, and the failure would show up later as a triple fault or a hang."""
        if exit.nr != KVM_HC_MAP_GPA_RANGE:
            return False
        gpa, npages, attrs = exit.args[0], exit.args[1], exit.args[2]
        with self.lock:
            self.counts.hypercalls += 1
            try:
                if npages == 0 or npages > (1 << 52) // PAGE_SIZE:
                    raise ConversionError(f"bad page count {npages}")
                to_private = bool(attrs & KVM_MAP_GPA_RANGE_ENCRYPTED)
                if to_private:
                    self._refuse_protected(vcpu, gpa, npages * PAGE_SIZE, "KVM_HC_MAP_GPA_RANGE")
                self.converter.convert(gpa, npages * PAGE_SIZE, to_private, self.policy_for.get(vcpu.id))
                ret = 0
            except ConversionError as e:
                self.counts.rejected_hypercalls += 1
                ret = -e.errno
            except OSError as e:  # KVM refused the attributes: tell the guest, keep the VM
                self.counts.rejected_hypercalls += 1
                ret = -(e.errno or errno.EINVAL)
        vcpu.set_hypercall_ret(ret)
        return True
