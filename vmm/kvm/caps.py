"""Capability probes asked on the fd where the answer means something; the selftests' require_*
gates, `vmm doctor` and `vmm boot` all use these, so they agree on what a host can do."""

from __future__ import annotations

import os

from .system import Kvm
from .uapi import KVM_HC_MAP_GPA_RANGE, Cap, GmemFlag, VmType

PRIVATE_MEM_REASON = "KVM_X86_SW_PROTECTED_VM in KVM_CAP_VM_TYPES"


def private_memory(kvm: Kvm) -> bool:
    """True when KVM can create KVM_X86_SW_PROTECTED_VM (private memory without hardware)."""
    return VmType.SW_PROTECTED in kvm.vm_types()


def gmem_flags(kvm: Kvm, vm_type: int = VmType.DEFAULT) -> int:
    """KVM_CAP_GUEST_MEMFD_FLAGS asked on a VM of ``vm_type`` (0 before Linux 6.18)."""
    with kvm.create_vm(vm_type) as vm:
        return vm.check_extension(Cap.GUEST_MEMFD_FLAGS)


def guest_memfd(kvm: Kvm, vm_type: int = VmType.DEFAULT) -> bool:
    """KVM_CAP_GUEST_MEMFD asked on a VM of ``vm_type``: whether its memslots take a guest_memfd."""
    with kvm.create_vm(vm_type) as vm:
        return vm.check_extension(Cap.GUEST_MEMFD) > 0


def hypercall_exits(kvm: Kvm) -> tuple[bool, str]:
    """Whether a guest vmcall/vmmcall reaches userspace as KVM_EXIT_HYPERCALL on this host, and if
    not, what is missing."""
    if not kvm.check_extension(Cap.EXIT_HYPERCALL) & (1 << KVM_HC_MAP_GPA_RANGE):
        return False, "KVM_HC_MAP_GPA_RANGE in KVM_CAP_EXIT_HYPERCALL"
    if os.path.isdir("/sys/module/kvm_pvm"):
        return False, "hypercall exits from the guest (kvm_pvm does not forward vmcall/vmmcall)"
    return True, ""


MMAP_SHARED = GmemFlag.MMAP | GmemFlag.INIT_SHARED


def auto_backing(kvm: Kvm, private: bool) -> tuple[str, bool]:
    """The most guest_memfd-backed slot 0 this host offers, and whether the VM must be
    KVM_X86_SW_PROTECTED_VM for it: a mmap'd guest_memfd alone (6.18), else memfd + guest_memfd on a
    default VM, else on a KVM_X86_SW_PROTECTED_VM (6.12), else shared memory."""
    vm_type = VmType.SW_PROTECTED if private else VmType.DEFAULT
    with kvm.create_vm(vm_type) as probe:
        if not private and probe.check_extension(Cap.GUEST_MEMFD_FLAGS) & MMAP_SHARED == MMAP_SHARED:
            return "guest_memfd-only", private
        if probe.check_extension(Cap.GUEST_MEMFD):
            return "guest_memfd", private
    if private_memory(kvm):
        return "guest_memfd", True
    return "shared", private
