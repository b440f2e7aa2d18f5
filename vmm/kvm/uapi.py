"""KVM user API for x86-64: ioctl numbers, constants and structs, mirroring include/uapi/linux/kvm.h.

Pure data, no behaviour. Every number here is checked against real kernel headers by
selftests/test_uapi_layout.py (structs by size and field offset, ioctls and constants by value).
Names keep the kernel's spelling minus the ``KVM_`` prefix where a class already says it.
"""

from __future__ import annotations

import ctypes
from ctypes import c_char, c_uint8, c_uint16, c_uint32, c_uint64
from enum import IntEnum, IntFlag
from typing import TypeVar

# --- ioctl encoding (include/uapi/asm-generic/ioctl.h) -------------------------------------------

_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2

KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << _IOC_DIRSHIFT) | (KVMIO << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, struct: type) -> int:
    return _ioc(_IOC_READ, nr, ctypes.sizeof(struct))


def _iow(nr: int, struct: type) -> int:
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(struct))


def _iowr(nr: int, struct: type) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(struct))


def ioc_size(request: int) -> int:
    """_IOC_SIZE(request): the size of the struct an ioctl number was encoded with (0 for _IO)."""
    return (request >> _IOC_SIZESHIFT) & ((1 << _IOC_SIZEBITS) - 1)


# --- structs ------------------------------------------------------------------------------------


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    ]


class kvm_userspace_memory_region2(ctypes.Structure):
    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
        ("guest_memfd_offset", c_uint64),
        ("guest_memfd", c_uint32),
        ("pad1", c_uint32),
        ("pad2", c_uint64 * 14),
    ]


class kvm_create_guest_memfd(ctypes.Structure):
    _fields_ = [("size", c_uint64), ("flags", c_uint64), ("reserved", c_uint64 * 6)]


class kvm_memory_attributes(ctypes.Structure):
    _fields_ = [
        ("address", c_uint64),
        ("size", c_uint64),
        ("attributes", c_uint64),
        ("flags", c_uint64),
    ]


class kvm_pre_fault_memory(ctypes.Structure):
    _fields_ = [("gpa", c_uint64), ("size", c_uint64), ("flags", c_uint64), ("padding", c_uint64 * 5)]


class kvm_stats_header(ctypes.Structure):
    """What a stats fd holds at offset 0 (KVM_GET_STATS_FD, api.rst 4.133)."""

    _fields_ = [
        ("flags", c_uint32),
        ("name_size", c_uint32),
        ("num_desc", c_uint32),
        ("id_offset", c_uint32),
        ("desc_offset", c_uint32),
        ("data_offset", c_uint32),
    ]


class kvm_stats_desc(ctypes.Structure):
    """One stat's descriptor; ``char name[]`` (header.name_size bytes) follows it in the fd."""

    _fields_ = [
        ("flags", c_uint32),
        ("exponent", ctypes.c_int16),
        ("size", c_uint16),
        ("offset", c_uint32),
        ("bucket_size", c_uint32),
    ]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [("cap", c_uint32), ("flags", c_uint32), ("args", c_uint64 * 4), ("pad", c_uint8 * 64)]


class kvm_regs(ctypes.Structure):
    _fields_ = [
        (name, c_uint64)
        for name in ("rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split())
    ]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        *((seg, kvm_segment) for seg in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        *((reg, c_uint64) for reg in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")),
        ("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", c_uint32),
        ("index", c_uint32),
        ("flags", c_uint32),
        ("eax", c_uint32),
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    ]


class kvm_cpuid2(ctypes.Structure):
    """Header only: ``entries`` (kvm_cpuid_entry2[nent]) follows it in the same buffer."""

    _fields_ = [("nent", c_uint32), ("padding", c_uint32)]


class kvm_x86_mce(ctypes.Structure):
    """A machine check to inject (KVM_X86_SET_MCE): MCi_STATUS/ADDR/MISC of ``bank`` and MCG_STATUS."""

    _fields_ = [
        ("status", c_uint64),
        ("addr", c_uint64),
        ("misc", c_uint64),
        ("mcg_status", c_uint64),
        ("bank", c_uint8),
        ("pad1", c_uint8 * 7),
        ("pad2", c_uint64 * 3),
    ]


# kvm_run and its exit union


class kvm_run_hw(ctypes.Structure):
    _fields_ = [("hardware_exit_reason", c_uint64)]


class kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class kvm_run_ex(ctypes.Structure):
    _fields_ = [("exception", c_uint32), ("error_code", c_uint32)]


class kvm_run_io(ctypes.Structure):
    _fields_ = [
        ("direction", c_uint8),
        ("size", c_uint8),
        ("port", c_uint16),
        ("count", c_uint32),
        ("data_offset", c_uint64),
    ]


class kvm_run_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", c_uint64), ("data", c_uint8 * 8), ("len", c_uint32), ("is_write", c_uint8)]


class kvm_run_hypercall(ctypes.Structure):
    _fields_ = [("nr", c_uint64), ("args", c_uint64 * 6), ("ret", c_uint64), ("flags", c_uint64)]


class kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class kvm_run_system_event(ctypes.Structure):
    _fields_ = [("type", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class kvm_run_memory_fault(ctypes.Structure):
    _fields_ = [("flags", c_uint64), ("gpa", c_uint64), ("size", c_uint64)]


class kvm_run_exit(ctypes.Union):
    _fields_ = [
        ("hw", kvm_run_hw),
        ("fail_entry", kvm_run_fail_entry),
        ("ex", kvm_run_ex),
        ("io", kvm_run_io),
        ("mmio", kvm_run_mmio),
        ("hypercall", kvm_run_hypercall),
        ("internal", kvm_run_internal),
        ("system_event", kvm_run_system_event),
        ("memory_fault", kvm_run_memory_fault),
        ("padding", c_char * 256),
    ]


class kvm_run(ctypes.Structure):
    """The vCPU's shared run page; the exit union is anonymous as in C (``run.io.port``)."""

    _anonymous_ = ("exit",)
    _fields_ = [
        ("request_interrupt_window", c_uint8),
        ("immediate_exit", c_uint8),
        ("padding1", c_uint8 * 6),
        ("exit_reason", c_uint32),
        ("ready_for_interrupt_injection", c_uint8),
        ("if_flag", c_uint8),
        ("flags", c_uint16),
        ("cr8", c_uint64),
        ("apic_base", c_uint64),
        ("exit", kvm_run_exit),
        ("kvm_valid_regs", c_uint64),
        ("kvm_dirty_regs", c_uint64),
        ("s", c_char * 2048),
    ]


# --- ioctls -------------------------------------------------------------------------------------

# system (/dev/kvm)
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, kvm_cpuid2)
KVM_X86_GET_MCE_CAP_SUPPORTED = _ior(0x9D, c_uint64)
# VM
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_NR_MMU_PAGES = _io(0x44)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_USER_MEMORY_REGION2 = _iow(0x49, kvm_userspace_memory_region2)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_ENABLE_CAP = _iow(0xA3, kvm_enable_cap)
KVM_SET_MEMORY_ATTRIBUTES = _iow(0xD2, kvm_memory_attributes)
KVM_CREATE_GUEST_MEMFD = _iowr(0xD4, kvm_create_guest_memfd)
# vCPU
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, kvm_regs)
KVM_SET_REGS = _iow(0x82, kvm_regs)
KVM_GET_SREGS = _ior(0x83, kvm_sregs)
KVM_SET_SREGS = _iow(0x84, kvm_sregs)
KVM_SET_CPUID2 = _iow(0x90, kvm_cpuid2)
KVM_X86_SETUP_MCE = _iow(0x9C, c_uint64)
KVM_X86_SET_MCE = _iow(0x9E, kvm_x86_mce)
KVM_PRE_FAULT_MEMORY = _iowr(0xD5, kvm_pre_fault_memory)
KVM_GET_STATS_FD = _io(0xCE)  # on a VM or vCPU fd

KVM_API_VERSION = 12

# --- constants ----------------------------------------------------------------------------------


class Cap(IntEnum):
    """KVM_CAP_* numbers this project asks about."""

    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    MCE = 31
    SYNC_MMU = 16
    MAX_VCPUS = 66
    READONLY_MEM = 81
    IMMEDIATE_EXIT = 136
    EXIT_HYPERCALL = 201
    BINARY_STATS_FD = 203
    DISABLE_QUIRKS2 = 213
    USER_MEMORY2 = 231
    MEMORY_FAULT_INFO = 232
    MEMORY_ATTRIBUTES = 233
    GUEST_MEMFD = 234
    VM_TYPES = 235
    PRE_FAULT_MEMORY = 236
    GUEST_MEMFD_FLAGS = 244  # 6.18+; 243 is an unrelated arm64 capability


class ExitReason(IntEnum):
    """KVM_EXIT_* values found in kvm_run.exit_reason."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    X86_BUS_LOCK = 33
    NOTIFY = 37
    MEMORY_FAULT = 39


class VmType(IntEnum):
    """KVM_X86_*_VM: the argument of KVM_CREATE_VM and the bits of KVM_CAP_VM_TYPES."""

    DEFAULT = 0
    SW_PROTECTED = 1
    SEV = 2
    SEV_ES = 3
    SNP = 4


class MemFlag(IntFlag):
    """KVM_MEM_* flags of a memslot."""

    LOG_DIRTY_PAGES = 1 << 0
    READONLY = 1 << 1
    GUEST_MEMFD = 1 << 2


class GmemFlag(IntFlag):
    """GUEST_MEMFD_FLAG_* of KVM_CREATE_GUEST_MEMFD (6.18+, advertised by KVM_CAP_GUEST_MEMFD_FLAGS)."""

    MMAP = 1 << 0
    INIT_SHARED = 1 << 1


# kvm_stats_desc.flags: type, unit and base fields, each 4 bits
KVM_STATS_TYPE_SHIFT, KVM_STATS_UNIT_SHIFT, KVM_STATS_BASE_SHIFT = 0, 4, 8
KVM_STATS_TYPE_MASK = 0xF << KVM_STATS_TYPE_SHIFT
KVM_STATS_UNIT_MASK = 0xF << KVM_STATS_UNIT_SHIFT
KVM_STATS_BASE_MASK = 0xF << KVM_STATS_BASE_SHIFT


class StatsType(IntEnum):
    """KVM_STATS_TYPE_*: how a stat evolves (flags & KVM_STATS_TYPE_MASK)."""

    CUMULATIVE = 0 << KVM_STATS_TYPE_SHIFT
    INSTANT = 1 << KVM_STATS_TYPE_SHIFT
    PEAK = 2 << KVM_STATS_TYPE_SHIFT
    LINEAR_HIST = 3 << KVM_STATS_TYPE_SHIFT
    LOG_HIST = 4 << KVM_STATS_TYPE_SHIFT
    MAX = LOG_HIST


class StatsUnit(IntEnum):
    """KVM_STATS_UNIT_*: what a stat counts (flags & KVM_STATS_UNIT_MASK)."""

    NONE = 0 << KVM_STATS_UNIT_SHIFT
    BYTES = 1 << KVM_STATS_UNIT_SHIFT
    SECONDS = 2 << KVM_STATS_UNIT_SHIFT
    CYCLES = 3 << KVM_STATS_UNIT_SHIFT
    BOOLEAN = 4 << KVM_STATS_UNIT_SHIFT
    MAX = BOOLEAN


class StatsBase(IntEnum):
    """KVM_STATS_BASE_*: the base of a stat's exponent (flags & KVM_STATS_BASE_MASK)."""

    POW10 = 0 << KVM_STATS_BASE_SHIFT
    POW2 = 1 << KVM_STATS_BASE_SHIFT
    MAX = POW2


KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3
# KVM_CAP_DISABLE_QUIRKS2 bit (6.12+): on a default VM, deleting or moving any memslot zaps every
# mapping of the VM, not only the slot's (api.rst "KVM_X86_QUIRK_SLOT_ZAP_ALL")
KVM_X86_QUIRK_SLOT_ZAP_ALL = 1 << 7
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_EXIT_HYPERCALL_LONG_MODE = 1 << 0
KVM_HC_MAP_GPA_RANGE = 12
# include/uapi/linux/kvm_para.h: MAP_GPA_RANGE attributes in args[2]
KVM_MAP_GPA_RANGE_PAGE_SZ_4K = 0
KVM_MAP_GPA_RANGE_PAGE_SZ_2M = 1 << 0
KVM_MAP_GPA_RANGE_PAGE_SZ_1G = 1 << 1
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
KVM_MAP_GPA_RANGE_DECRYPTED = 0 << 4


class SystemEvent(IntEnum):
    """KVM_SYSTEM_EVENT_* in kvm_run.system_event.type."""

    SHUTDOWN = 1
    RESET = 2
    CRASH = 3
    WAKEUP = 4
    SUSPEND = 5
    SEV_TERM = 6


class InternalError(IntEnum):
    """KVM_INTERNAL_ERROR_* in kvm_run.internal.suberror."""

    EMULATION = 1
    SIMUL_EX = 2
    DELIVERY_EV = 3
    UNEXPECTED_EXIT_REASON = 4


_E = TypeVar("_E", bound=IntEnum)


def enum_name(enum: type[_E], value: int) -> str:
    """The member name for ``value`` (``ExitReason`` 2 -> "IO"), or the number when unknown."""
    try:
        return enum(value).name
    except ValueError:
        return str(value)
