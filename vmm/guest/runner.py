"""The run loop: enters a vCPU until a ucall the test wants, dispatching every other exit to a
handler, and stopping with a clear error on guest asserts, bad ucalls, unexpected exits, timeouts
and stops.

The guest is untrusted: its strings are shown as data (dump.printable), its pointers and lengths
are checked against guest memory (a bad one is the guest's failure: UcallError), a failed assert's
file name only selects the guest's own source (never a host path), its output is bounded per run,
and a timeout bounds the whole run (run_until_done, Machine.run_all), not each step."""

from __future__ import annotations

import errno
import math
import os
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

from vmm.errors import (
    GuestAssertion,
    GuestError,
    GuestTimeout,
    UcallError,
    UnexpectedExit,
    VcpuStopped,
    VmmError,
)
from vmm.kvm.exits import Exit, ExitHandlers, HypercallExit, IoExit, MemoryFaultExit, MmioExit
from vmm.kvm import uapi
from vmm.kvm.uapi import KVM_EXIT_IO_OUT, ExitReason

from .reports import guest_exception, poisoned_fault, sigbus_error
from .dump import guest_text, read_source_line, source_line, vcpu_state
from .layout import DEBUGCON_PORT, UCALL_PORT, UCALL_SLOT, ucall_block
from .ucall import GuestOutput, Ucall, UcallCmd, decode
from .watchdog import Watchdog, deadline_after

if TYPE_CHECKING:
    from vmm.kvm.vcpu import Vcpu
    from vmm.memory.regions import GuestMemory

# Hot path of Runner.run (one pass per guest exit): plain ints, since an IntEnum member lookup
# costs ~0.1 us in CPython 3.11, and struct instead of slicing + int.from_bytes.
_EXIT_IO, _EXIT_INTR, _EXIT_HLT = int(ExitReason.IO), int(ExitReason.INTR), int(ExitReason.HLT)
_SYNC, _DONE, _PRINT, _ABORT = int(UcallCmd.SYNC), int(UcallCmd.DONE), int(UcallCmd.PRINT), int(UcallCmd.ABORT)
_EXCEPTION = int(UcallCmd.EXCEPTION)
_EHWPOISON = getattr(errno, "EHWPOISON", 133)
_U32 = struct.Struct("<I")
_IO_WORD = uapi.kvm_run.io.offset // 4  # kvm_run.io's first u32 in Vcpu.run_u32

#: bytes of one PRINT shown at most (the kernel's UCALL_BUFFER_LEN is 1024); the rest is cut, with a note
PRINT_MAX = 4096
#: bytes of an assert's file name and expression read from the guest at most
NAME_MAX, EXPR_MAX = 255, 1024


_watchdog = Watchdog()  # one for every runner in the process


def _ignore_sync(uc: Ucall) -> None:
    """run_until_done without on_sync: SYNCs are passed over."""


def print_guest_output(vcpu_id: int, text: str) -> None:
    """The default output of guest PRINTs and console lines: stdout, one line each."""
    print(text, flush=True)


class Runner:
    """Runs one vCPU; ``run()`` returns at the next SYNC or DONE ucall or at HLT."""

    def __init__(
        self,
        vcpu: Vcpu,
        memory: GuestMemory,
        handlers: ExitHandlers | None = None,
        output: Callable[[int, str], None] = print_guest_output,
        source: Path | None = None,
    ) -> None:
        self.vcpu = vcpu
        self.memory = memory
        self.handlers = handlers or ExitHandlers()
        self.exit_counts = [0] * 64
        self.source = source  # the guest's own source: a failed assert naming it shows its line
        self.timed_out = False  # set by the watchdog (or a caller) before it kicks the vCPU
        self.stop_reason: str | None = None  # set by stop()
        self._timeout: float | None = None  # the bound of the current run, for its message
        self._kick_lock = threading.Lock()  # kick() never signals a thread that has left the loop
        self.guest_output = GuestOutput(vcpu.id, output)  # PRINTs and console lines, bounded per run
        self._low_view: memoryview | bytes = b""  # _low_memory()'s answer for memory.generation ...
        self._low_generation = -1  # ... this one
        self._block = ucall_block(vcpu.id)  # this vCPU's ucall block

    @property
    def output(self) -> Callable[[int, str], None]:
        """Where guest PRINTs and console lines go: ``output(vcpu_id, text)``."""
        return self.guest_output.output

    @output.setter
    def output(self, output: Callable[[int, str], None]) -> None:
        self.guest_output.output = output

    # --- entry points ---------------------------------------------------------------------------
    #
    # A kick (stop() or the watchdog's timeout) sets its flag, then kicks the vCPU under _kick_lock:
    # immediate_exit for the next entry, and KICK_SIGNAL to vcpu.thread_ident for a KVM_RUN in
    # progress. The loop clears immediate_exit before it reads the flags, so no kick is lost; the
    # flags are consumed by the error they raise and reset when a run begins. A thread clears
    # thread_ident under the same lock before it leaves a run (run_until_done, run_all's threads,
    # a timed run()), so no kick ever signals a thread that may have ended. Only the untimed run()
    # step, the benchmark's hot path, clears it without the lock.

    def run(self, timeout: float | None = None) -> Ucall | Exit:
        """Enter the guest until it syncs, finishes or halts; ``timeout`` seconds at most for this
        call (a finite number > 0, or None). A stop() since the last step makes this one raise
        VcpuStopped. A console line the guest has not ended is passed on when it finishes, fails or
        halts."""
        vcpu = self.vcpu
        if timeout is None:  # the stepping hot path (one call per SYNC): no watchdog, no lock
            vcpu.thread_ident = threading.get_ident()
            try:
                return self._loop()
            finally:
                vcpu.thread_ident = None
        self._begin(timeout, deadline_after(timeout))
        vcpu.thread_ident = threading.get_ident()
        try:
            return self._loop()
        finally:
            self._leave()
            self._finish()

    def run_until_done(
        self, timeout: float | None = None, on_sync: Callable[[Ucall], None] | None = None
    ) -> Ucall | Exit:
        """Run through SYNCs (passed to ``on_sync``) until DONE or HLT; ``timeout`` seconds at most
        for the whole run (a finite number > 0, or None), however many SYNCs it makes."""
        self._begin(timeout, deadline_after(timeout))
        try:
            return self._until_done(on_sync)
        finally:
            self._finish()

    def stop(self, why: str = "stopped from outside") -> None:
        """Make the current run raise VcpuStopped promptly (or, between run() steps, the next
        step), from any thread: a vCPU inside KVM_RUN leaves it at once."""
        with self._kick_lock:
            self.stop_reason = why
            self.vcpu.kick()

    def _time_out(self) -> None:
        """The watchdog's kick: the run raises GuestTimeout."""
        with self._kick_lock:
            self.timed_out = True
            self.vcpu.kick()

    def _begin(self, timeout: float | None, deadline: float | None) -> None:
        """Start a run: no timeout or stop pending, no kick left over from the last run, and the
        watchdog watching ``deadline`` (an absolute time.monotonic(); None: no timeout)."""
        self.timed_out = False
        self.stop_reason = None
        self._timeout = timeout
        self.vcpu.catch_sigbus()
        if self.vcpu.kvm_run is not None:
            self.vcpu.kvm_run.immediate_exit = 0
        if deadline is not None:
            _watchdog.watch(self, deadline)

    def _leave(self) -> None:
        """The running thread leaves the run: no kick signals it after this."""
        with self._kick_lock:
            self.vcpu.thread_ident = None

    def _finish(self) -> None:
        """End a run: the watchdog lets go of this runner, and a kick that came as the run ended
        is dropped."""
        _watchdog.unwatch(self)
        with self._kick_lock:
            self.timed_out = False
            self.stop_reason = None
            if self.vcpu.kvm_run is not None:
                self.vcpu.kvm_run.immediate_exit = 0

    def _until_done(self, on_sync: Callable[[Ucall], None] | None) -> Ucall | Exit:
        """run_until_done between _begin and _finish, on the vCPU's thread (Machine.run_all begins
        every runner before it starts any thread)."""
        self.vcpu.thread_ident = threading.get_ident()
        try:
            return self._loop(on_sync or _ignore_sync)
        finally:
            self._leave()

    # --- the loop -------------------------------------------------------------------------------

    def _loop(self, on_sync: Callable[[Ucall], None] | None = None) -> Ucall | Exit:
        """Enter the guest until SYNC, DONE or HLT (an exception for everything that ends the run);
        with ``on_sync``, SYNCs go to it and the loop goes on (run_until_done: no return and
        re-entry per SYNC, 1.5 us less per exit on this host)."""
        vcpu, counts, block, memory = self.vcpu, self.exit_counts, self._block, self.memory
        run_u32, enter, vcpu_id = vcpu.run_u32, vcpu.run, vcpu.id
        low_view = self._low_view if self._low_generation == memory.generation else self._low_memory()
        try:
            while True:
                reason = enter()
                counts[reason & 63] += 1
                if reason == _EXIT_IO:
                    # kvm_run.io's first word: direction (u8), size (u8), port (u16); read through the u32
                    # view, no ctypes object made per run() call (the stepping hot path)
                    if run_u32[_IO_WORD] >> 16 == UCALL_PORT and run_u32[_IO_WORD] & 0xFF == KVM_EXIT_IO_OUT:
                        uc = decode(low_view, vcpu_id, block) if low_view else self._far_ucall(block)
                        if uc is None:
                            raise self._bad_header(block)
                        cmd = uc.cmd
                        if cmd == _SYNC:
                            if on_sync is None:
                                return uc
                            on_sync(uc)
                            if self._low_generation != memory.generation:  # on_sync changed memslots
                                low_view = self._low_memory()
                            continue
                        if cmd == _DONE:
                            self.guest_output.end()
                            return uc
                        self._ucall(uc)
                    elif run_u32[_IO_WORD] >> 16 == DEBUGCON_PORT and run_u32[_IO_WORD] & 0xFF == KVM_EXIT_IO_OUT:
                        io = vcpu.kvm_run.io
                        off = io.data_offset
                        self.guest_output.console(vcpu.run_bytes[off : off + io.size * io.count].tobytes())
                    elif not self.handlers.on_io(vcpu, cast(IoExit, vcpu.exit(reason))):
                        raise self.unexpected(reason)
                elif reason == _EXIT_INTR:
                    # clear first, then look: a kick sets its flag before immediate_exit, so none is lost
                    vcpu.kvm_run.immediate_exit = 0
                    if vcpu.sigbus is not None:
                        sigbus, vcpu.sigbus = vcpu.sigbus, None
                        raise sigbus_error(vcpu.id, sigbus, self.memory)
                    if self.timed_out or self.stop_reason is not None:
                        raise self._interrupted()
                elif reason == _EXIT_HLT:
                    self.guest_output.end()
                    return vcpu.exit(reason)
                elif not self._dispatch(reason):
                    raise self.unexpected(reason)
        except BaseException:
            self.guest_output.end()
            raise

    def _interrupted(self) -> GuestError:
        """The error for a kick: a timeout (the watchdog's) or a stop (stop()'s); it consumes the flag."""
        vcpu, why = self.vcpu, self.stop_reason
        self.stop_reason = None
        if self.timed_out:
            self.timed_out = False
            within = f"within {self._timeout:g} s " if self._timeout is not None else ""
            return GuestTimeout(
                f"vCPU {vcpu.id}: the run did not finish {within}(guest still running)\n"
                + vcpu_state(vcpu, self.memory)
            )
        return VcpuStopped(vcpu.id, why or "stopped")

    def _dispatch(self, reason: int) -> bool:
        """Hand an exit the loop does not decide itself to its handler (Firecracker's
        handle_kvm_exit); False when nobody takes it."""
        h, vcpu, exit = self.handlers, self.vcpu, self.vcpu.exit(reason)
        if reason == ExitReason.MEMORY_FAULT:
            fault = cast(MemoryFaultExit, exit)
            if vcpu.fault_errno == _EHWPOISON:  # no conversion helps: "userspace's decision"
                raise poisoned_fault(vcpu.id, fault, self.memory)
            return h.on_memory_fault(vcpu, fault)
        if reason == ExitReason.HYPERCALL:
            return h.on_hypercall(vcpu, cast(HypercallExit, exit))
        if reason == ExitReason.MMIO:
            return h.on_mmio(vcpu, cast(MmioExit, exit))
        return False

    def _low_memory(self) -> memoryview | bytes:
        """Slot 0's view when it holds this vCPU's ucall block, so the hot path reads the block
        without a region lookup (cached until a memslot comes or goes: the lookup took 1.6 us per
        run() call); empty otherwise, and _far_ucall says why."""
        memory = self.memory
        if self._low_generation == memory.generation:
            return self._low_view
        try:
            low: memoryview | bytes = memory.region_at(0).host_view
        except VmmError:
            low = b""
        if len(low) < ucall_block(self.vcpu.id) + UCALL_SLOT:
            low = b""
        self._low_view, self._low_generation = low, memory.generation
        return low

    def unexpected(self, reason: int) -> UnexpectedExit:
        """The error for an exit nobody handled, with registers and code at RIP."""
        exit = self.vcpu.exit(reason)
        why = f"unexpected {exit}: a triple fault (an exception the guest's IDT could not deliver)" * (
            reason == ExitReason.SHUTDOWN
        )
        return UnexpectedExit(self.vcpu.id, exit, vcpu_state(self.vcpu, self.memory), why)

    # --- ucalls ---------------------------------------------------------------------------------

    def _bad_ucall(
        self, why: str, cmd: int | None, address: int | None = None, length: int | None = None
    ) -> UcallError:
        vcpu, exit = self.vcpu, self.vcpu.exit(ExitReason.IO)
        state = vcpu_state(vcpu, self.memory)
        return UcallError(vcpu.id, exit, state, f"bad ucall: {why}\n  at {exit}", cmd, address, length)

    def _far_ucall(self, addr: int) -> Ucall | None:
        """The ucall block when slot 0 has no host view of it (e.g. slot 0 is too small or gone)."""
        try:
            return decode(self.memory.view(addr, UCALL_SLOT), self.vcpu.id)
        except VmmError as e:
            raise self._bad_ucall(
                f"vCPU {self.vcpu.id}'s ucall block [{addr:#x}, +{UCALL_SLOT:#x}) is not in guest memory the host "
                f"reads: {e}",
                None,
                addr,
                UCALL_SLOT,
            ) from None

    def _bad_header(self, addr: int) -> UcallError:
        """The error for a block whose header decode() refused."""
        header = _U32.unpack_from(self.memory.view(addr, 4))[0]
        return self._bad_ucall(
            f"header {header:#x} of the block at {addr:#x}: at most 6 arguments (bits 8-15) and no bits above "
            "UCALL_WIDE (bit 16)",
            header & 0xFF,
            addr,
            4,
        )

    def _guest_bytes(self, uc: Ucall, what: str, addr: int, length: int, limit: int) -> bytes:
        """The first ``limit`` bytes of [addr, addr+length), which must lie in one memslot the host
        may read; UcallError otherwise."""
        try:
            region = self.memory.region_at(addr)
            if length > region.end - addr:
                raise VmmError(f"it crosses the end of its memslot at {region.end:#x}")
            return bytes(self.memory.view(addr, min(length, limit)))
        except VmmError as e:
            raise self._bad_ucall(
                f"{what} [{addr:#x}, +{length:#x}) is outside the guest memory the host reads: {e}",
                uc.cmd,
                addr,
                length,
            ) from None

    def _string(self, uc: Ucall, what: str, addr: int, limit: int) -> str:
        """A NUL-terminated guest string (cut at ``limit`` bytes or its memslot's end), as data."""
        try:
            end = self.memory.region_at(addr).end
        except VmmError as e:
            raise self._bad_ucall(
                f"{what} at {addr:#x} is outside the guest memory the host reads: {e}", uc.cmd, addr
            ) from None
        raw = self._guest_bytes(uc, what, addr, min(limit, end - addr), limit)
        return guest_text(raw.split(b"\0", 1)[0])

    def _ucall(self, uc: Ucall) -> None:
        """PRINT and ABORT; any other command is the guest's failure (as in the kernel's ucall)."""
        if uc.cmd == _PRINT:
            addr, length = uc.args[0], uc.args[1]
            text = guest_text(self._guest_bytes(uc, "PRINT text", addr, length, PRINT_MAX))
            note = f" [vmm: PRINT cut at {PRINT_MAX} of {length} bytes]" if length > PRINT_MAX else ""
            self.guest_output.line(text + note, min(length, PRINT_MAX))
        elif uc.cmd == _ABORT:
            file = self._string(uc, "ABORT file name", uc.args[0], NAME_MAX)
            expr = self._string(uc, "ABORT expression", uc.args[2], EXPR_MAX)
            line = uc.args[1]
            text = self._source_line(file, line)
            raise GuestAssertion(uc.vcpu_id, file, line, expr, uc.args[3], uc.args[4], text)
        elif uc.cmd == _EXCEPTION:
            raise guest_exception(uc, self.memory)
        else:
            raise self._bad_ucall(f"Unknown ucall {uc.cmd:#x}.", uc.cmd)

    def _source_line(self, file: str, line: int) -> str:
        """The assert's source line, from the guest's own source only (``source``): the name the
        guest sends selects that file or nothing, never a host path."""
        return source_line(self.source, file, line)
