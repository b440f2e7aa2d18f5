"""Decoding what a tracee asked of KVM: ioctl names and argument structs, KVM_RUN exits from its
kvm_run page, syscall numbers. Every layout comes from vmm.kvm.uapi (the one table of structs);
this module only says which struct goes with which ioctl and how to print it."""

from __future__ import annotations

import ctypes
import errno
from typing import Any

from ptrace.syscall.names import SYSCALL_NAMES

from vmm.kvm import exits, syscalls, uapi
from vmm.kvm.uapi import Cap, ExitReason, GmemFlag, MemFlag, VmType, enum_name

# x86-64 syscall numbers, by name, from python-ptrace's table (which also lists the x32 ABI's
# numbers from 512 up, e.g. ioctl 514: the first number of a name is the 64-bit one)
NR: dict[str, int] = {}
for _nr, _name in sorted(SYSCALL_NAMES.items()):
    NR.setdefault(_name, _nr)
NR_IOCTL = NR["ioctl"]

# every KVM ioctl number uapi.py defines, by number (the name keeps the KVM_ prefix, as strace prints it)
IOCTL_NAMES: dict[int, str] = {
    v: k
    for k, v in vars(uapi).items()
    if k.startswith("KVM_") and isinstance(v, int) and v > 0xFF and (v >> 8) & 0xFF == uapi.KVMIO
}

# the struct each ioctl's pointer argument points at (only those worth decoding)
ARG_STRUCTS: dict[int, type[ctypes.Structure]] = {
    uapi.KVM_SET_USER_MEMORY_REGION: uapi.kvm_userspace_memory_region,
    uapi.KVM_SET_USER_MEMORY_REGION2: uapi.kvm_userspace_memory_region2,
    uapi.KVM_CREATE_GUEST_MEMFD: uapi.kvm_create_guest_memfd,
    uapi.KVM_SET_MEMORY_ATTRIBUTES: uapi.kvm_memory_attributes,
    uapi.KVM_PRE_FAULT_MEMORY: uapi.kvm_pre_fault_memory,
    uapi.KVM_ENABLE_CAP: uapi.kvm_enable_cap,
}

# how much of kvm_run an exit needs: everything before kvm_valid_regs (header and exit union)
RUN_HEADER = uapi.kvm_run.kvm_valid_regs.offset
_RUN_PAD = bytes(ctypes.sizeof(uapi.kvm_run) - RUN_HEADER)
_RUN_READ = 4096 + 64  # kvm_run and the first bytes of the PIO page (the vCPU mapping is 3+ pages)

# <asm-generic/mman-common.h>, <linux/falloc.h>, <fcntl.h>
MADV_NAMES = {4: "MADV_DONTNEED", 9: "MADV_REMOVE", 8: "MADV_FREE"}
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
F_DUPFD, F_DUPFD_CLOEXEC = 0, 1030
MAP_SHARED = 0x01


def ioctl_name(request: int) -> str:
    """KVM_FOO, or KVM_IOC(nr) for a KVM ioctl uapi.py does not name."""
    return IOCTL_NAMES.get(request) or f"KVM_IOC({request & 0xFF:#x})"


def is_kvm_ioctl(request: int) -> bool:
    """The ioctl number has KVM's type byte (0xAE)."""
    return (request >> 8) & 0xFF == uapi.KVMIO


def struct_fields(s: ctypes.Structure) -> dict[str, Any]:
    """The fields of a uapi struct as plain values, padding and reserved words left out."""
    out: dict[str, Any] = {}
    for name, *_ in s._fields_:
        if name.startswith(("pad", "reserved")):
            continue
        v = getattr(s, name)
        out[name] = list(v) if isinstance(v, ctypes.Array) else v
    return out


def read_struct(pid: int, addr: int, cls: type[ctypes.Structure]) -> ctypes.Structure | None:
    """One process_vm_readv of the struct at ``addr`` in ``pid``; None if it cannot be read."""
    try:
        raw = syscalls.process_vm_readv(pid, addr, ctypes.sizeof(cls))
    except OSError:
        return None
    return cls.from_buffer_copy(raw) if len(raw) == ctypes.sizeof(cls) else None


def read_exit(pid: int, run_addr: int) -> exits.Exit | None:
    """The exit a vCPU's kvm_run at ``run_addr`` (in ``pid``) describes, decoded by vmm.kvm.exits.
    One read covers the struct and the start of the PIO page after it (KVM puts an IO exit's data
    at data_offset 4096), so an IO exit costs one process_vm_readv like the others."""
    try:
        page = syscalls.process_vm_readv(pid, run_addr, _RUN_READ)
    except OSError:
        return None
    if len(page) < RUN_HEADER:
        return None
    run = uapi.kvm_run.from_buffer_copy(page[:RUN_HEADER] + _RUN_PAD)
    if run.exit_reason == ExitReason.IO and run.io.data_offset + run.io.size * run.io.count > len(page):
        io = run.io  # data beyond the first read: fetch it where it is
        try:
            data = syscalls.process_vm_readv(pid, run_addr + io.data_offset, io.size * io.count)
        except OSError:
            data = b""
        page = bytes(io.data_offset) + data
    return exits.decode(run, run.exit_reason, memoryview(page))


def map_gpa_range(h: exits.HypercallExit) -> tuple[int, int, bool, int] | None:
    """KVM_HC_MAP_GPA_RANGE's (gpa, size, to_private, page size) from args (gpa, npages, attrs)."""
    if h.nr != uapi.KVM_HC_MAP_GPA_RANGE:
        return None
    gpa, npages, attrs = h.args[0], h.args[1], h.args[2]
    page = 1 << 30 if attrs & uapi.KVM_MAP_GPA_RANGE_PAGE_SZ_1G else 2 << 20 if attrs & 1 else 4096
    return gpa, npages * 4096, bool(attrs & uapi.KVM_MAP_GPA_RANGE_ENCRYPTED), page


def exit_fields(e: exits.Exit) -> dict[str, Any]:
    """An exit as JSON-able fields (reason by name)."""
    out: dict[str, Any] = {"reason": enum_name(ExitReason, e.reason)}
    for name in getattr(e, "__slots__", ()):
        v = getattr(e, name)
        out[name] = v.hex() if isinstance(v, bytes) else list(v) if isinstance(v, tuple) else v
    if isinstance(e, exits.HypercallExit) and (m := map_gpa_range(e)):
        out["map_gpa_range"] = {"gpa": m[0], "size": m[1], "private": m[2], "page_size": m[3]}
    return out


def exit_text(e: exits.Exit) -> str:
    """One short line for an exit: vmm.kvm.exits' own text, MAP_GPA_RANGE spelled out."""
    if isinstance(e, exits.HypercallExit) and (m := map_gpa_range(e)):
        to = "private" if m[2] else "shared"
        return f"KVM_EXIT_HYPERCALL MAP_GPA_RANGE gpa={m[0]:#x} size={size(m[1])} -> {to} (page {size(m[3])})"
    return str(e)


def size(n: int) -> str:
    """A byte count as 4K, 2M, 1G when exact, hex otherwise."""
    if n == 0:
        return "0"
    for unit, suffix in ((1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")):
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return hex(n)


def flag_names(cls: type, value: int) -> str:
    """IntFlag bits by name, unknown bits in hex; 0 as 0."""
    if not value:
        return "0"
    names = [m.name for m in cls if m.value & value and m.name]  # type: ignore[attr-defined]
    rest = value & ~sum(m.value for m in cls)  # type: ignore[attr-defined]
    return "|".join(names + ([hex(rest)] if rest else []))


def errname(err: int) -> str:
    """-EFAULT style for a negative syscall return."""
    return f"-{errno.errorcode.get(err, str(err))}"


def arg_text(request: int, f: dict[str, Any]) -> str:
    """The decoded argument struct of ``request`` in one line."""
    if request in (uapi.KVM_SET_USER_MEMORY_REGION, uapi.KVM_SET_USER_MEMORY_REGION2):
        text = (
            f"slot={f['slot']:#x} flags={flag_names(MemFlag, f['flags'])} gpa={f['guest_phys_addr']:#x} "
            f"size={size(f['memory_size'])} hva={f['userspace_addr']:#x}"
        )
        if f["flags"] & MemFlag.GUEST_MEMFD:
            text += f" guest_memfd={f['guest_memfd']} offset={f['guest_memfd_offset']:#x}"
        return text
    if request == uapi.KVM_CREATE_GUEST_MEMFD:
        return f"size={size(f['size'])} flags={flag_names(GmemFlag, f['flags'])}"
    if request == uapi.KVM_SET_MEMORY_ATTRIBUTES:
        a = "PRIVATE" if f["attributes"] & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE else hex(f["attributes"])
        return f"gpa={f['address']:#x} size={size(f['size'])} attributes={a if f['attributes'] else 'SHARED'}"
    if request == uapi.KVM_PRE_FAULT_MEMORY:
        return f"gpa={f['gpa']:#x} size={size(f['size'])} flags={f['flags']:#x}"
    if request == uapi.KVM_ENABLE_CAP:
        return f"cap={cap_name(f['cap'])} flags={f['flags']:#x} args={[hex(a) for a in f['args']]}"
    return ""


def cap_name(cap: int) -> str:
    """KVM_CAP_FOO or the number."""
    name = enum_name(Cap, cap)
    return name if name.isdigit() else f"KVM_CAP_{name}"


def vm_type_name(t: int) -> str:
    """KVM_X86_FOO_VM or the number."""
    name = enum_name(VmType, t)
    return name if name.isdigit() else f"KVM_X86_{name}_VM"
