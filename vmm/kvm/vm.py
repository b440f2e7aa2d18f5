"""A VM fd: memslots, guest_memfd creation, memory attributes, capabilities, vCPU creation."""

from __future__ import annotations

import errno
import fcntl
import os
from typing import TYPE_CHECKING

from vmm.errors import KvmError

from . import uapi
from .fd import KvmFd, describe, ioctl_name
from .gmem import GuestMemfd
from .stats import Stats
from .uapi import Cap
from .vcpu import Vcpu

if TYPE_CHECKING:
    from .system import Kvm


class Vm(KvmFd):
    """One VM (the fd KVM_CREATE_VM returned)."""

    kind = "VM"

    def __init__(self, kvm: Kvm, fd: int, vm_type: int, vcpu_mmap_size: int) -> None:
        super().__init__(fd)
        self.kvm = kvm
        self.type = vm_type
        self.vcpu_mmap_size = vcpu_mmap_size  # handed down to each vCPU (kvm-ioctls' run_size)
        self.pid = os.getpid()  # the process whose mm the VM is bound to
        self._memory_attributes: int | None = None

    def check_extension(self, cap: Cap | int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd: the answer for this VM's type."""
        return self.ioctl(uapi.KVM_CHECK_EXTENSION, int(cap))

    def enable_cap(self, cap: Cap | int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP with up to four arguments."""
        req = uapi.kvm_enable_cap(cap=int(cap), flags=flags)
        for i, a in enumerate(args):
            req.args[i] = a
        self.ioctl(uapi.KVM_ENABLE_CAP, req)

    def set_user_memory_region(self, slot: int, flags: int, gpa: int, size: int, userspace_addr: int) -> None:
        """KVM_SET_USER_MEMORY_REGION (v1); size 0 deletes the slot."""
        self.ioctl(
            uapi.KVM_SET_USER_MEMORY_REGION,
            uapi.kvm_userspace_memory_region(
                slot=slot, flags=flags, guest_phys_addr=gpa, memory_size=size, userspace_addr=userspace_addr
            ),
        )

    def set_user_memory_region2(
        self,
        slot: int,
        flags: int,
        gpa: int,
        size: int,
        userspace_addr: int = 0,
        guest_memfd: int = 0,
        guest_memfd_offset: int = 0,
    ) -> None:
        """KVM_SET_USER_MEMORY_REGION2: a memslot, optionally bound to a guest_memfd range."""
        self.ioctl(
            uapi.KVM_SET_USER_MEMORY_REGION2,
            uapi.kvm_userspace_memory_region2(
                slot=slot,
                flags=flags,
                guest_phys_addr=gpa,
                memory_size=size,
                userspace_addr=userspace_addr,
                guest_memfd_offset=guest_memfd_offset,
                guest_memfd=guest_memfd,
            ),
        )

    def create_guest_memfd(self, size: int, flags: int = 0) -> GuestMemfd:
        """KVM_CREATE_GUEST_MEMFD: a file of guest-private memory bound to this VM."""
        fd = self.ioctl(uapi.KVM_CREATE_GUEST_MEMFD, uapi.kvm_create_guest_memfd(size=size, flags=flags))
        return GuestMemfd(fd, size, flags)

    def set_memory_attributes(self, gpa: int, size: int, attributes: int, flags: int = 0) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES on [gpa, gpa+size); retried while KVM says EAGAIN or EINTR.
        Attribute bits this VM does not support are refused before the ioctl (EINVAL, as KVM would)."""
        req = uapi.kvm_memory_attributes(address=gpa, size=size, attributes=attributes, flags=flags)
        unsupported = attributes & ~self.supported_memory_attributes()
        if unsupported:
            raise KvmError(
                ioctl_name(uapi.KVM_SET_MEMORY_ATTRIBUTES),
                errno.EINVAL,
                describe(req),
                self.kind,
                f"attribute bits {unsupported:#x} not in this VM's KVM_CAP_MEMORY_ATTRIBUTES "
                f"({self.supported_memory_attributes():#x}): not issued",
            )
        # the kernel advances address/size as it goes, so a retry resumes where it stopped
        self.retrying(uapi.KVM_SET_MEMORY_ATTRIBUTES, req, (errno.EAGAIN, errno.EINTR))

    def supported_memory_attributes(self) -> int:
        """KVM_CAP_MEMORY_ATTRIBUTES on this VM: the attribute bits it accepts (0: none); asked once."""
        if self._memory_attributes is None:
            self._memory_attributes = self.check_extension(Cap.MEMORY_ATTRIBUTES)
        return self._memory_attributes

    def dead_vm_note(self) -> str:
        """After an EIO: probe KVM_CHECK_EXTENSION(KVM_CAP_USER_MEMORY), which only a dead VM (or
        another process: KVM checks kvm->mm first) fails; the selftests' __TEST_ASSERT_VM_VCPU_IOCTL."""
        if self.closed:
            return ""
        try:
            fcntl.ioctl(self.fd, uapi.KVM_CHECK_EXTENSION, int(Cap.USER_MEMORY))
        except OSError:
            if os.getpid() != self.pid:
                return f"the VM belongs to process {self.pid}: KVM refuses its ioctls from any other process"
            return "KVM killed the VM; check dmesg"
        return ""

    def stats(self) -> Stats:
        """KVM_GET_STATS_FD: this VM's binary stats (remote_tlb_flush, mmu zaps, pages_4k/2m/1g...);
        a new fd each call, closed with the returned object."""
        return Stats(self.ioctl(uapi.KVM_GET_STATS_FD), "VM")

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """KVM_CREATE_VCPU, with its kvm_run page mapped."""
        return Vcpu(self, self.ioctl(uapi.KVM_CREATE_VCPU, vcpu_id), vcpu_id, self.vcpu_mmap_size)
