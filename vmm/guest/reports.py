"""What a run loop reports when the guest meets a CPU exception or poisoned memory: the typed errors
built from an exception ucall (guest/include/vmm_exceptions.h), a memory-fault exit with EHWPOISON,
and a SIGBUS KVM sent the vCPU thread (Vcpu.sigbus)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmm.errors import GuestError, GuestException, MemoryPoisoned, VcpuStopped, VmmError
from vmm.kvm.exits import MemoryFaultExit
from vmm.kvm.syscalls import BUS_MCEERR_AO, BUS_MCEERR_AR
from vmm.memory.regions import PAGE_SIZE, Backing

from .layout import EXC_BANK_FOUND
from .ucall import Ucall
from .x86 import exception_name

if TYPE_CHECKING:
    from vmm.memory.regions import GuestMemory

_MCE_CODES = {BUS_MCEERR_AR: "BUS_MCEERR_AR", BUS_MCEERR_AO: "BUS_MCEERR_AO"}


def guest_exception(uc: Ucall, memory: GuestMemory) -> GuestException:
    """The CPU exception the guest's stubs reported (its word: every field is shown as sent)."""
    info, error_code, rip, cr2, mc_status, mc_addr = uc.args
    vector = info & 0xFF
    bank = (info >> 8) & 0xFF if info & EXC_BANK_FOUND else None
    try:  # RIP is a GPA: the guest runs on identity page tables (or segment 0 in real mode)
        code = memory.read(rip, 16).hex(" ")
    except VmmError:
        code = ""
    name = exception_name(vector)
    return GuestException(uc.vcpu_id, vector, name, error_code, rip, cr2, bank, mc_status, mc_addr, code)


def poisoned_fault(vcpu_id: int, fault: MemoryFaultExit, memory: GuestMemory) -> MemoryPoisoned:
    """KVM_RUN -1 EHWPOISON with a memory-fault exit: kvm_gmem_get_pfn() found the page poisoned.
    The page is recorded in ``memory.poisoned`` (vmm's host accesses refuse it from now on)."""
    memory.poisoned.add(fault.gpa & ~(PAGE_SIZE - 1))
    side = "private" if fault.private else "shared"
    return MemoryPoisoned(vcpu_id, fault.gpa, side, f"KVM_RUN -1 EHWPOISON with {fault}")


def sigbus_error(vcpu_id: int, sigbus: tuple[int, int, int], memory: GuestMemory) -> GuestError:
    """A SIGBUS the vCPU thread took inside KVM_RUN: KVM's for a poisoned host page behind a shared
    access (kvm_send_hwpoison_signal(): BUS_MCEERR_AR, si_addr = the host address) is MemoryPoisoned;
    any other (kill -BUS) only stops the run."""
    code, addr, lsb = sigbus
    if code not in _MCE_CODES:
        return VcpuStopped(vcpu_id, f"SIGBUS (si_code {code}, not a memory error) on the vCPU thread in KVM_RUN")
    gpa = memory.gpa_of_hva(addr)
    if gpa is None:
        where = "no memslot"
    else:
        memory.poisoned.add(gpa & ~(PAGE_SIZE - 1))
        only = memory.region_at(gpa).backing is Backing.GUEST_MEMFD_ONLY
        where = "the guest_memfd's mapping" if only else "the shared memfd"
    reported = f"SIGBUS {_MCE_CODES[code]} on the vCPU thread, si_addr {addr:#x} ({where}), si_addr_lsb {lsb}; KVM_RUN -1 EINTR"
    return MemoryPoisoned(vcpu_id, gpa, "shared", reported, addr)
