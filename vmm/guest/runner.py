"""The run loop: enters a vCPU until a ucall the test wants, dispatching every other exit to a
handler, and stopping with a clear error on guest asserts, unexpected exits and timeouts."""

from __future__ import annotations

import os
import struct
import threading
import time
import weakref
from typing import TYPE_CHECKING, Callable, cast

from vmm.errors import GuestAssertion, GuestTimeout, UnexpectedExit, VmmError
from vmm.kvm.exits import Exit, ExitHandlers, HypercallExit, IoExit, MemoryFaultExit, MmioExit
from .dump import vcpu_state
from .layout import DEBUGCON_PORT, UCALL_PORT, UCALL_SIZE
from .ucall import Ucall, UcallCmd, decode
from vmm.kvm.uapi import KVM_EXIT_IO_OUT, ExitReason

if TYPE_CHECKING:
    from vmm.memory.regions import GuestMemory
    from vmm.kvm.vcpu import Vcpu

# Hot path of Runner.run (one pass per guest exit): plain ints, since an IntEnum member lookup
# costs ~0.1 us in CPython 3.11, and struct instead of slicing + int.from_bytes.
_EXIT_IO = int(ExitReason.IO)
_RETURNING_UCALLS = (int(UcallCmd.SYNC), int(UcallCmd.DONE))
_U32 = struct.Struct("<I")





class _Watchdog:
    """One daemon thread that kicks vCPUs whose deadline passed (cheaper than a timer per run)."""

    PERIOD = 0.02

    def __init__(self) -> None:
        self.runners: "weakref.WeakSet[Runner]" = weakref.WeakSet()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def watch(self, runner: "Runner") -> None:
        with self.lock:
            self.runners.add(runner)
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="vmm-watchdog", daemon=True)
                self.thread.start()

    def _loop(self) -> None:
        while True:
            time.sleep(self.PERIOD)
            now = time.monotonic()
            with self.lock:
                runners = list(self.runners)
            for r in runners:
                if r.deadline is not None and now >= r.deadline and not r.timed_out:
                    r.timed_out = True
                    r.vcpu.kick()


_watchdog = _Watchdog()


def print_guest_output(vcpu_id: int, text: str) -> None:
    """The default output of guest PRINTs and console lines: stdout, one line each."""
    print(text, flush=True)


class Runner:
    """Runs one vCPU; ``run()`` returns at the next SYNC or DONE ucall or at HLT."""

    def __init__(
        self,
        vcpu: "Vcpu",
        memory: "GuestMemory",
        handlers: ExitHandlers | None = None,
        output: Callable[[int, str], None] = print_guest_output,
    ) -> None:
        self.vcpu = vcpu
        self.memory = memory
        self.handlers = handlers or ExitHandlers()
        self.output = output
        self.exit_counts = [0] * 64
        self.deadline: float | None = None
        self.timed_out = False
        self._console = bytearray()
        self.source_dirs: list[str] = []  # where to look up the source line of a failed assert

    def run(self, timeout: float | None = None) -> Ucall | Exit:
        """Enter the guest until it syncs, finishes or halts; ``timeout`` seconds at most."""
        vcpu, run_page, counts = self.vcpu, self.vcpu.kvm_run, self.exit_counts
        run_bytes, io, enter = vcpu.run_bytes, run_page.io, vcpu.run  # views reused for every exit
        low_view, low_end = self._low_memory()
        vcpu.thread_ident = threading.get_ident()
        if timeout is not None:
            self.timed_out = False
            self.deadline = time.monotonic() + timeout
            _watchdog.watch(self)
        try:
            while True:
                reason = enter()
                counts[reason & 63] += 1
                if reason == _EXIT_IO:
                    if io.port == UCALL_PORT and io.direction == KVM_EXIT_IO_OUT and io.size == 4:
                        addr = _U32.unpack_from(run_bytes, io.data_offset)[0]
                        if addr <= low_end:
                            uc = decode(low_view, vcpu.id, addr)
                        else:
                            uc = decode(self.memory.view(addr, UCALL_SIZE), vcpu.id)
                        if uc.cmd in _RETURNING_UCALLS:
                            return uc
                        self._ucall(uc)
                    elif io.port == DEBUGCON_PORT and io.direction == KVM_EXIT_IO_OUT:
                        self._debugcon(cast(IoExit, vcpu.exit(reason)).data)
                    elif not self.handlers.on_io(vcpu, cast(IoExit, vcpu.exit(reason))):
                        raise self.unexpected(reason)
                elif reason == ExitReason.INTR:
                    run_page.immediate_exit = 0
                    if self.timed_out:
                        raise GuestTimeout(
                            f"vCPU {vcpu.id}: no ucall within {timeout} s (guest still running)\n"
                            + vcpu_state(vcpu, self.memory)
                        )
                elif reason == ExitReason.HLT:
                    return vcpu.exit(reason)
                elif not self._dispatch(reason):
                    raise self.unexpected(reason)
        finally:
            self.deadline = None

    def _dispatch(self, reason: int) -> bool:
        """Hand an exit the loop does not decide itself to its handler (Firecracker's
        handle_kvm_exit); False when nobody takes it."""
        h, vcpu, exit = self.handlers, self.vcpu, self.vcpu.exit(reason)
        if reason == ExitReason.MEMORY_FAULT:
            return h.on_memory_fault(vcpu, cast(MemoryFaultExit, exit))
        if reason == ExitReason.HYPERCALL:
            return h.on_hypercall(vcpu, cast(HypercallExit, exit))
        if reason == ExitReason.MMIO:
            return h.on_mmio(vcpu, cast(MmioExit, exit))
        return False

    def _low_memory(self) -> tuple[memoryview | bytes, int]:
        """Slot 0's view and the last address a ucall block may start at there: ucall blocks live
        on the stacks in slot 0, so the hot path reads them without a region lookup."""
        try:
            low = self.memory.region_at(0)
        except VmmError:
            return b"", -1
        return low.view, low.end - UCALL_SIZE

    def unexpected(self, reason: int) -> UnexpectedExit:
        """The error for an exit nobody handled, with registers and code at RIP."""
        return UnexpectedExit(self.vcpu.id, self.vcpu.exit(reason), vcpu_state(self.vcpu, self.memory))

    def _ucall(self, uc: Ucall) -> None:
        if uc.cmd == UcallCmd.PRINT:
            self.output(uc.vcpu_id, bytes(self.memory.view(uc.args[0], uc.args[1])).decode(errors="replace"))
        elif uc.cmd == UcallCmd.ABORT:
            file = self.memory.read_string(uc.args[0])
            expr = self.memory.read_string(uc.args[2])
            line = _source_line(self.source_dirs, file, uc.args[1])
            raise GuestAssertion(uc.vcpu_id, file, uc.args[1], expr, uc.args[3], uc.args[4], line)
        else:
            raise self.unexpected(ExitReason.IO)

    def _debugcon(self, data: bytes) -> None:
        self._console += data
        while b"\n" in self._console:
            line, _, rest = bytes(self._console).partition(b"\n")
            self._console = bytearray(rest)
            self.output(self.vcpu.id, line.decode(errors="replace"))

    def run_until_done(self, timeout: float | None = None, on_sync: Callable[[Ucall], None] | None = None) -> Ucall | Exit:
        """Run through SYNCs (passed to ``on_sync``) until DONE or HLT."""
        while True:
            result = self.run(timeout)
            if isinstance(result, Ucall) and result.cmd == UcallCmd.SYNC:
                if on_sync:
                    on_sync(result)
                continue
            return result


def _source_line(dirs: list[str], file: str, line: int) -> str:
    """The text of ``file``:``line`` when the guest source is found in one of ``dirs``."""
    for base in dirs:
        try:
            with open(os.path.join(base, file), errors="replace") as f:
                for i, text in enumerate(f, 1):
                    if i == line:
                        return text
        except OSError:
            continue
    return ""
