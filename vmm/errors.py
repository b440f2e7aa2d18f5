"""Every exception vmm raises, in one tree.

VmmError            a user mistake or unmet requirement: str() is one line for the CLI
├── KvmError        an ioctl or syscall on a KVM fd failed (also an OSError, errno set)
├── ConversionError a private<->shared conversion that cannot be honoured
└── GuestError      the guest stopped in a way the test did not expect
    ├── GuestAssertion    GUEST_ASSERT/GUEST_FAIL in the guest
    ├── GuestException    a CPU exception (#UD, #PF, #MC, ...) reported by the guest's exception stubs
    ├── UnexpectedExit    an exit no handler took
    │   └── UcallError    a ucall with a pointer or length outside guest memory, or an unknown command
    ├── GuestTimeout      the run did not finish in time
    ├── VcpuStopped       the run was stopped from outside (another vCPU of the run failed)
    ├── MemoryFaultError  a KVM_EXIT_MEMORY_FAULT the VMM cannot resolve
    └── MemoryPoisoned    the guest ran onto a poisoned (hardware-error) page
"""

from __future__ import annotations

import errno as _errno
import os


class VmmError(Exception):
    """A user mistake or unmet requirement; str() is a one-line message for the CLI."""


class KvmError(VmmError, OSError):
    """A KVM ioctl (or a syscall on a KVM fd) failed: names the call, errno and decoded arguments."""

    def __init__(self, call: str, err: int, args: str = "", fd_kind: str = "", note: str = "") -> None:
        self.call = call
        self.errno_name = _errno.errorcode.get(err, f"E{err}")
        self.arguments = args
        self.fd_kind = fd_kind
        self.note = note  # e.g. "KVM killed the VM": what a probe after the failure found
        OSError.__init__(self, err, os.strerror(err))

    def __str__(self) -> str:
        where = f" on {self.fd_kind} fd" if self.fd_kind else ""
        args = f"({self.arguments})" if self.arguments else ""
        note = f"; {self.note}" if self.note else ""
        return f"{self.call}{args}{where} failed: {self.errno_name} ({self.errno}): {self.strerror}{note}"


class ConversionError(VmmError):
    """A conversion request that cannot be honoured (alignment, range, attributes); ``errno`` is
    what a MAP_GPA_RANGE hypercall returns to the guest for it."""

    def __init__(self, message: str, err: int = _errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = err


class GuestError(VmmError):
    """The guest stopped in a way the test did not expect (assert, shutdown, timeout, bad exit)."""


class GuestAssertion(GuestError):
    """A GUEST_ASSERT failed (or GUEST_FAIL ran) in the guest."""

    def __init__(self, vcpu_id: int, file: str, line: int, expr: str, a: int, b: int, source_line: str) -> None:
        self.vcpu_id, self.file, self.line, self.expr, self.a, self.b = vcpu_id, file, line, expr, a, b
        shown = f"\n    {source_line.strip()}" if source_line else ""
        values = f": {a:#x} != {b:#x}" if "==" in expr else ""
        super().__init__(f"vCPU {vcpu_id}: {file}:{line}: guest assertion failed: {expr}{values}{shown}")


class GuestException(GuestError):
    """A CPU exception in the guest, reported by its exception stubs (guest/include/vmm_exceptions.h)
    through UCALL_EXCEPTION: vector and its mnemonic (``name``: "#PF"), error code, RIP, CR2 and, for
    #MC, the reporting bank (None when no bank had MCi_STATUS.VAL) with its MCi_STATUS/MCi_ADDR and
    MCG_STATUS (in the error code's place: #MC pushes none)."""

    def __init__(
        self,
        vcpu_id: int,
        vector: int,
        name: str,
        error_code: int,
        rip: int,
        cr2: int = 0,
        bank: int | None = None,
        mc_status: int = 0,
        mc_addr: int = 0,
        code: str = "",
    ) -> None:
        self.vcpu_id, self.vector, self.name, self.error_code, self.rip, self.cr2 = (
            vcpu_id, vector, name, error_code, rip, cr2
        )  # fmt: skip
        self.bank, self.mc_status, self.mc_addr = bank, mc_status, mc_addr
        what = f"vCPU {vcpu_id}: guest exception {name} (vector {vector}) at rip {rip:#x}"
        if vector == 18:
            where = f"bank {bank}: MCi_STATUS {mc_status:#x} MCi_ADDR {mc_addr:#x}" if bank is not None else "no bank"
            what += f", MCG_STATUS {error_code:#x}, {where}"
        else:
            what += f", error code {error_code:#x}"
            if vector == 14:
                what += f", cr2 {cr2:#x}"
        super().__init__(what + (f"\n  code at {rip:#x}: {code}" if code else ""))


class UnexpectedExit(GuestError):
    """An exit no handler took; ``exit`` is the typed exit (vmm.kvm.exits), the message carries it and
    the vCPU state. errors.py imports nothing of vmm, so every layer can raise these."""

    def __init__(self, vcpu_id: int, exit: object, state: str, why: str = "") -> None:
        self.exit = exit
        self.vcpu_id = vcpu_id
        what = why or f"unexpected {exit}"
        super().__init__(f"vCPU {vcpu_id}: {what}\n{state}")


class UcallError(UnexpectedExit):
    """A ucall the VMM cannot honour: its block, a string or a PRINT text lies (partly) outside guest
    memory, or its command is unknown (the kernel's ``TEST_FAIL("Unknown ucall 0x%lx.")``). The
    guest's failure, not the user's: ``address``/``length`` are the bad range, ``cmd`` the command (None when
    the block itself is unreadable)."""

    def __init__(
        self, vcpu_id: int, exit: object, state: str, why: str, cmd: int | None, address: int | None, length: int | None
    ) -> None:
        self.cmd, self.address, self.length = cmd, address, length
        super().__init__(vcpu_id, exit, state, why)


class GuestTimeout(GuestError):
    """The guest did not finish within the allowed time."""


class VcpuStopped(GuestError):
    """A vCPU's run was stopped from outside (Runner.stop): in Machine.run_all, because another
    vCPU of the same run failed first; run_all reports that failure, not this."""

    def __init__(self, vcpu_id: int, why: str) -> None:
        self.vcpu_id = vcpu_id
        super().__init__(f"vCPU {vcpu_id}: {why}")


class MemoryFaultError(GuestError):
    """A memory fault the VMM cannot resolve; shows the exit and the attribute map around it."""


class MemoryPoisoned(GuestError):
    """A vCPU ran onto a poisoned page (memory_failure(): a hardware error, or MADV_HWPOISON in a
    test kernel). Names the vCPU, the GPA (None when KVM gave no address), the side (``"private"``:
    the guest_memfd; ``"shared"``: the memslot's host mapping) and what KVM reported: KVM_RUN's
    errno with a memory-fault exit (private), or a SIGBUS with its si_code on the vCPU thread."""

    def __init__(self, vcpu_id: int, gpa: int | None, side: str, reported: str, hva: int | None = None) -> None:
        self.vcpu_id, self.gpa, self.side, self.reported, self.hva = vcpu_id, gpa, side, reported, hva
        at = f"gpa {gpa:#x}" if gpa is not None else f"hva {hva:#x} (in no memslot)" if hva is not None else "?"
        super().__init__(f"vCPU {vcpu_id}: memory poisoned at {at} ({side}): {reported}")
