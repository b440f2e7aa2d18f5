"""/dev/kvm: the system fd. Asks global questions and creates VMs."""

from __future__ import annotations

import ctypes
import errno
import os
from functools import cached_property

from vmm.errors import VmmError

from . import uapi
from .fd import KvmFd
from .uapi import Cap, VmType
from .vm import Vm

KVM_DEVICE = "/dev/kvm"  # $VMM_KVM_DEVICE overrides it


class Kvm(KvmFd):
    """The KVM subsystem (/dev/kvm)."""

    kind = "/dev/kvm"

    def __init__(self, path: str | None = None) -> None:
        path = path or os.environ.get("VMM_KVM_DEVICE") or KVM_DEVICE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VmmError(f"{path} does not exist: load kvm_intel/kvm_amd or use a host with KVM") from None
        except PermissionError:  # the advice follows the device's real owner, group and mode
            raise VmmError(f"no read/write access to {path} ({access_advice(path)})") from None
        except OSError as e:
            raise VmmError(f"cannot open {path}: {os.strerror(e.errno or 0)}") from None
        super().__init__(fd)
        self.path = path
        version = self.api_version()
        if version != uapi.KVM_API_VERSION:
            self.close()
            raise VmmError(f"{path} speaks KVM API {version}, vmm needs {uapi.KVM_API_VERSION}")

    def api_version(self) -> int:
        """KVM_GET_API_VERSION: always 12 on a sane kernel."""
        return self.ioctl(uapi.KVM_GET_API_VERSION)

    def check_extension(self, cap: Cap | int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm: system-wide answer (VM-scoped caps: ask the VM)."""
        return self.ioctl(uapi.KVM_CHECK_EXTENSION, int(cap))

    @cached_property
    def vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: bytes to mmap from a vCPU fd (kvm_run and friends)."""
        return self.ioctl(uapi.KVM_GET_VCPU_MMAP_SIZE)

    def vm_types(self) -> set[int]:
        """VM types from KVM_CAP_VM_TYPES (a bitmask); just the default VM when the cap is absent."""
        mask = self.check_extension(Cap.VM_TYPES) or (1 << VmType.DEFAULT)
        return {t for t in range(64) if mask & (1 << t)}

    @cached_property
    def supported_cpuid(self) -> bytearray:
        """KVM_GET_SUPPORTED_CPUID as a kvm_cpuid2 buffer, ready for KVM_SET_CPUID2."""
        nent = 64
        while True:
            buf = bytearray(ctypes.sizeof(uapi.kvm_cpuid2) + nent * ctypes.sizeof(uapi.kvm_cpuid_entry2))
            uapi.kvm_cpuid2.from_buffer(buf).nent = nent
            try:
                self.ioctl(uapi.KVM_GET_SUPPORTED_CPUID, buf)
            except OSError as e:
                if e.errno == errno.E2BIG and nent < 4096:
                    nent *= 2
                    continue
                raise
            used = uapi.kvm_cpuid2.from_buffer(buf).nent
            return buf[: ctypes.sizeof(uapi.kvm_cpuid2) + used * ctypes.sizeof(uapi.kvm_cpuid_entry2)]

    def mce_cap_supported(self) -> int:
        """KVM_X86_GET_MCE_CAP_SUPPORTED: the MCG_CAP bits KVM_X86_SETUP_MCE accepts (the bank
        count, bits 7:0, is KVM_CAP_MCE's answer instead)."""
        buf = bytearray(8)
        self.ioctl(uapi.KVM_X86_GET_MCE_CAP_SUPPORTED, buf)
        return int.from_bytes(buf, "little")

    def create_vm(self, vm_type: VmType | int = VmType.DEFAULT) -> Vm:
        """KVM_CREATE_VM of the given type (KVM_X86_SW_PROTECTED_VM for private memory)."""
        return Vm(self, self.ioctl(uapi.KVM_CREATE_VM, int(vm_type)), int(vm_type), self.vcpu_mmap_size)


def access_advice(path: str) -> str:
    """Why this process may not open ``path`` read/write, from the file's owner, group and mode, and
    what to do: e.g. "root:kvm 0660: join group kvm", "root:root 0600: run as root". Used by the
    error in Kvm() (what `vmm boot` and `vmm doctor` print) and by the ``kvm`` fixture's skip."""
    import grp
    import pwd
    import stat

    try:
        st = os.stat(path)
    except OSError as e:
        return os.strerror(e.errno or 0)
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        entry = grp.getgrgid(st.st_gid)
        group, members = entry.gr_name, entry.gr_mem
    except KeyError:
        group, members = str(st.st_gid), []
    mode = stat.S_IMODE(st.st_mode)
    rw = 0o6
    user_rw, group_rw, other_rw = (mode >> 6) & rw == rw, (mode >> 3) & rw == rw, mode & rw == rw
    in_group = st.st_gid == os.getegid() or st.st_gid in os.getgroups()
    if other_rw or (user_rw and st.st_uid == os.geteuid()) or (group_rw and in_group):
        advice = "the mode allows it: an ACL, a security module or a nodev mount refuses it"
    elif group_rw:
        try:
            me = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:
            me = ""
        # listed in /etc/group but not in this process's groups: the membership starts at the next login
        advice = f"you were added to group {group}: log in again" if me in members else f"join group {group}"
    elif user_rw:
        advice = f"run as {owner}"
    else:
        advice = "its mode gives no one read/write access"
    return f"{owner}:{group} {mode:04o}: {advice}"
