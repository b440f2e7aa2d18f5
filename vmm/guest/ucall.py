"""The guest->host call ABI (ucall), shared by every guest in guest/ (see guest/include/vmm.h).

Each vCPU owns a 64-byte block at ``layout.ucall_block(id)`` in slot 0, which the guest reaches
through %gs. A ucall stores a header and its arguments there and exits with one OUT to UCALL_PORT;
the host reads the block straight from guest memory: one exit per call and no extra ioctl.
Little-endian:

    u32 header      cmd (bits 0-7) | nargs (bits 8-15, at most 6) | UCALL_WIDE (bit 16, long mode)
    u64 args[6]     at offset 8; args beyond nargs read as 0, and without UCALL_WIDE (real mode
                    stores 32-bit halves) only each slot's low 32 bits count

    SYNC   args: stage and up to five values, returned to the host test
    PRINT  args[0] = address of the text, args[1] = its length
    ABORT  args[0] = address of the NUL-terminated source file name, args[1] = line,
           args[2] = address of the NUL-terminated expression, args[3] = left value, args[4] = right
    DONE   no args: the guest passed
    EXCEPTION (5, the kernel's UCALL_UNHANDLED) an exception stub of vmm_exceptions.h: args[0] =
           vector (| bank << 8 | EXC_BANK_FOUND for #MC), args[1] = error code (#MC: MCG_STATUS),
           args[2] = RIP, args[3] = CR2, args[4] = MCi_STATUS, args[5] = MCi_ADDR

The block's place is the host's choice, so a guest cannot point the host elsewhere; everything in
it is still the guest's word: the run loop (vmm.guest.runner) checks the header and every pointer
and length against guest memory, reads at most a bounded amount (PRINT_MAX, NAME_MAX, EXPR_MAX),
prints strings as data, and stops the run with UcallError on a bad header or pointer or an
unknown command (the kernel's ``TEST_FAIL("Unknown ucall 0x%lx.")``).

Why a fixed block and an 8-bit port (the kernel's ucall pool does the same): on this host's
kvm_pvm every guest instruction costs about 0.14 us and every store about 0.5 us (README "Benchmarks"),
so the old ABI, which pushed a 56-byte block and the saved registers on the stack, cost 18.7 us per
SYNC (C loop, quiet host) where this one costs 10.5 (a bare OUT: 8.3).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from enum import IntEnum
from typing import NamedTuple

from .dump import guest_text
from .layout import UCALL_WIDE

#: a console line (port 0xe9) is passed on in pieces of at most this many bytes
CONSOLE_LINE_MAX = 4096
#: guest output (console bytes and PRINT text) passed on per run by default; the rest is counted and dropped
OUTPUT_MAX = 1 << 20

_UCALL = struct.Struct("<I4x6Q")
_ZEROS = (0,) * 6
_ARGS_MAX = 6
_HEADER_BITS = 0xFF | 0xFF << 8 | UCALL_WIDE


class UcallCmd(IntEnum):
    """ucall commands (the numbers of the kernel selftests' enum ucall)."""

    SYNC = 1
    ABORT = 2
    PRINT = 3
    DONE = 4
    EXCEPTION = 5  # the kernel selftests' UCALL_UNHANDLED: guest/include/vmm_exceptions.h


class Ucall(NamedTuple):
    """One decoded guest->host call (a tuple: cheap to build once per exit)."""

    cmd: int
    args: tuple[int, ...]
    vcpu_id: int = 0

    @property
    def stage(self) -> int:
        """For SYNC: the first argument, by convention the stage number."""
        return self.args[0]


_new = tuple.__new__


def decode(block: memoryview | bytes, vcpu_id: int = 0, offset: int = 0) -> Ucall | None:
    """Decode the ucall block at ``offset`` in ``block``; None when its header is malformed (nargs
    above 6 or unknown bits)."""
    values = _UCALL.unpack_from(block, offset)
    header = values[0]
    n = header >> 8 & 0xFF
    if n > _ARGS_MAX or header & ~_HEADER_BITS:
        return None
    args = values[1 : 1 + n] + _ZEROS[n:] if n < _ARGS_MAX else values[1:]
    if not header & UCALL_WIDE:
        args = tuple(a & 0xFFFFFFFF for a in args)
    return _new(Ucall, (header & 0xFF, args, vcpu_id))


class GuestOutput:
    """What one vCPU says, PRINTs and console bytes (port 0xe9), passed on to ``output`` line by
    line, as data (dump.guest_text), within a budget of ``limit`` bytes per run: a console line
    longer than CONSOLE_LINE_MAX comes in pieces, output over the budget is counted and dropped
    (with a note when the budget runs out and the count at the end), and ``end()`` passes on an
    unended line. Every note vmm adds is in brackets and starts with "vmm:"."""

    def __init__(self, vcpu_id: int, output: Callable[[int, str], None], limit: int = OUTPUT_MAX) -> None:
        self.vcpu_id, self.output, self.limit = vcpu_id, output, limit
        self._console = bytearray()  # the console line being written
        self._passed = 0  # bytes passed on this run
        self._dropped = 0  # and dropped over the limit

    def line(self, text: str, nbytes: int) -> None:
        """Pass on one line of ``nbytes`` guest bytes (already made printable), within the budget."""
        if self._passed >= self.limit:
            self._dropped += nbytes
            return
        self._passed += nbytes
        self.output(self.vcpu_id, text)
        if self._passed >= self.limit:
            self.output(self.vcpu_id, f"[vmm: guest output reached {self.limit} bytes this run: the rest is dropped]")

    def console(self, data: bytes) -> None:
        """Bytes OUT to the console port. One exit per byte is the ABI, so this stays short: append,
        and look for lines only when a newline came or a bound is reached."""
        console = self._console
        if self._passed + len(console) >= self.limit:
            self._dropped += len(data)
            return
        console += data
        if b"\n" in data or len(console) >= CONSOLE_LINE_MAX or self._passed + len(console) >= self.limit:
            self._console_lines()

    def _console_lines(self) -> None:
        """Pass on the complete lines, then CONSOLE_LINE_MAX-byte pieces of an unended one, and the
        rest of it once the budget is full (so the note that says so comes now)."""
        console = self._console
        while (end := console.find(b"\n")) >= 0:
            line = bytes(console[:end])
            del console[: end + 1]
            self.line(guest_text(line), end + 1)
        while len(console) >= CONSOLE_LINE_MAX:
            piece = bytes(console[:CONSOLE_LINE_MAX])
            del console[:CONSOLE_LINE_MAX]
            self.line(guest_text(piece) + f" [vmm: line longer than {CONSOLE_LINE_MAX} bytes, continued]", len(piece))
        if console and self._passed + len(console) >= self.limit:
            piece = bytes(console)
            console.clear()
            self.line(guest_text(piece), len(piece))

    def end(self) -> None:
        """The run ended (DONE, HLT, failure, timeout): pass on the unended console line, say how
        much was dropped, and start a new budget."""
        if self._console:
            line = bytes(self._console)
            self._console.clear()
            self.line(guest_text(line) + " [vmm: no newline at the end of the run]", len(line))
        if self._dropped:
            self.output(self.vcpu_id, f"[vmm: {self._dropped} bytes of guest output dropped]")
        self._passed = self._dropped = 0
