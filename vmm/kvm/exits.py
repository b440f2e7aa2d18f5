"""Typed exits: one small value class per KVM_EXIT_* reason, decoded from the vCPU's kvm_run view."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import uapi
from .uapi import ExitReason, InternalError, SystemEvent, enum_name

if TYPE_CHECKING:
    from .vcpu import Vcpu


@dataclass(frozen=True, slots=True)
class Exit:
    """An exit without a payload worth decoding (HLT, SHUTDOWN, INTR, ...)."""

    reason: int

    def __str__(self) -> str:
        name = enum_name(ExitReason, self.reason)
        return f"exit reason {name}" if name.isdigit() else f"KVM_EXIT_{name}"


@dataclass(frozen=True, slots=True)
class IoExit(Exit):
    """KVM_EXIT_IO: port I/O. ``data`` is a copy of the bytes the guest wrote (OUT); for an IN it
    is what kvm_run held then, and the answer goes through Vcpu.set_pio_data."""

    port: int
    size: int
    count: int
    is_write: bool
    data: bytes

    def __str__(self) -> str:
        d = "out" if self.is_write else "in"
        return f"KVM_EXIT_IO {d} port={self.port:#x} size={self.size} count={self.count} data={self.data.hex()}"


@dataclass(frozen=True, slots=True)
class MmioExit(Exit):
    """KVM_EXIT_MMIO: an access to a GPA with no memslot."""

    phys_addr: int
    length: int
    is_write: bool
    data: bytes

    def __str__(self) -> str:
        d = "write" if self.is_write else "read"
        return f"KVM_EXIT_MMIO {d} gpa={self.phys_addr:#x} len={self.length} data={self.data.hex()}"


@dataclass(frozen=True, slots=True)
class FailEntryExit(Exit):
    """KVM_EXIT_FAIL_ENTRY: the hardware refused VM entry (bad guest state)."""

    hardware_reason: int
    cpu: int

    def __str__(self) -> str:
        return f"KVM_EXIT_FAIL_ENTRY hardware_entry_failure_reason={self.hardware_reason:#x} cpu={self.cpu}"


@dataclass(frozen=True, slots=True)
class InternalErrorExit(Exit):
    """KVM_EXIT_INTERNAL_ERROR: KVM could not handle something (often emulation)."""

    suberror: int
    data: tuple[int, ...]

    def __str__(self) -> str:
        sub = enum_name(InternalError, self.suberror)
        return f"KVM_EXIT_INTERNAL_ERROR suberror={sub} data=[{', '.join(hex(d) for d in self.data)}]"


@dataclass(frozen=True, slots=True)
class SystemEventExit(Exit):
    """KVM_EXIT_SYSTEM_EVENT: shutdown/reset/crash requested by the guest."""

    type: int
    data: tuple[int, ...]

    def __str__(self) -> str:
        kind = enum_name(SystemEvent, self.type)
        return f"KVM_EXIT_SYSTEM_EVENT type={kind} data=[{', '.join(hex(d) for d in self.data)}]"


@dataclass(frozen=True, slots=True)
class HypercallExit(Exit):
    """KVM_EXIT_HYPERCALL: a hypercall KVM forwards to userspace (e.g. KVM_HC_MAP_GPA_RANGE)."""

    nr: int
    args: tuple[int, ...]
    flags: int

    def __str__(self) -> str:
        return f"KVM_EXIT_HYPERCALL nr={self.nr} args=[{', '.join(hex(a) for a in self.args)}] flags={self.flags:#x}"


@dataclass(frozen=True, slots=True)
class MemoryFaultExit(Exit):
    """KVM_EXIT_MEMORY_FAULT: KVM could not map [gpa, gpa+size) with the access type ``flags`` says."""

    flags: int
    gpa: int
    size: int

    @property
    def private(self) -> bool:
        """The access needed the private side (KVM_MEMORY_EXIT_FLAG_PRIVATE)."""
        return bool(self.flags & uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE)

    def __str__(self) -> str:
        kind = "private" if self.private else "shared"
        return f"KVM_EXIT_MEMORY_FAULT {kind} flags={self.flags:#x} gpa={self.gpa:#x} size={self.size:#x}"


def decode(run: uapi.kvm_run, reason: int, run_page: memoryview) -> Exit:
    """The typed exit for ``reason`` from the current contents of ``run`` (``run_page``: its bytes)."""
    if reason == ExitReason.IO:
        io = run.io
        n = io.size * io.count
        data = bytes(run_page[io.data_offset : io.data_offset + n])
        return IoExit(reason, io.port, io.size, io.count, io.direction == uapi.KVM_EXIT_IO_OUT, data)
    if reason == ExitReason.MMIO:
        m = run.mmio
        return MmioExit(reason, m.phys_addr, m.len, bool(m.is_write), bytes(m.data)[: m.len])
    if reason == ExitReason.FAIL_ENTRY:
        f = run.fail_entry
        return FailEntryExit(reason, f.hardware_entry_failure_reason, f.cpu)
    if reason == ExitReason.INTERNAL_ERROR:
        i = run.internal
        return InternalErrorExit(reason, i.suberror, tuple(i.data[: min(i.ndata, 16)]))
    if reason == ExitReason.SYSTEM_EVENT:
        s = run.system_event
        return SystemEventExit(reason, s.type, tuple(s.data[: min(s.ndata, 16)]))
    if reason == ExitReason.HYPERCALL:
        h = run.hypercall
        return HypercallExit(reason, h.nr, tuple(h.args), h.flags)
    if reason == ExitReason.MEMORY_FAULT:
        m = run.memory_fault
        return MemoryFaultExit(reason, m.flags, m.gpa, m.size)
    return Exit(reason)


class ExitHandlers:
    """The exits a run loop does not decide itself, one method per kind. Each returns True when it
    handled the exit (answer slots filled through the Vcpu) and the guest should re-enter, False to
    let the run loop stop with UnexpectedExit. The base class handles nothing; the private-memory
    layer (vmm.memory.faults) overrides ``on_memory_fault`` and ``on_hypercall``."""

    def on_io(self, vcpu: Vcpu, exit: IoExit) -> bool:
        """A port I/O exit that is not a ucall or console byte (answer an IN with vcpu.set_pio_data)."""
        return False

    def on_mmio(self, vcpu: Vcpu, exit: MmioExit) -> bool:
        """An access to a GPA without a memslot (answer a read with vcpu.set_mmio_data)."""
        return False

    def on_hypercall(self, vcpu: Vcpu, exit: HypercallExit) -> bool:
        """A hypercall KVM forwarded (answer with vcpu.set_hypercall_ret)."""
        return False

    def on_memory_fault(self, vcpu: Vcpu, exit: MemoryFaultExit) -> bool:
        """KVM_EXIT_MEMORY_FAULT: KVM could not map the gpa the way the access needed."""
        return False
