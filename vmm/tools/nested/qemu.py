"""Driving QEMU: the command line, and one boot watched on its serial console.

QEMU must never outlive the run that started it. It runs in its own process group, which is
SIGKILLed as a whole when the run ends, however it ends (exception, Ctrl-C, a stop signal turned
into :class:`Interrupted`); and it has PR_SET_PDEATHSIG=SIGKILL, so even a SIGKILLed vmm takes
its QEMU along. (PDEATHSIG reaches QEMU only, not its children; QEMU as started here, with local
9p and no network, forks none, so the group is just QEMU.)
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import IO

from .host import is_inside
from .init import INIT_MARK, MSIZE, POWEROFF_MARK

QEMU_ENV = "VMM_QEMU"  # path or name of the QEMU binary to run instead of qemu-system-x86_64
QEMU = os.environ.get(QEMU_ENV) or "qemu-system-x86_64"
PR_SET_PDEATHSIG = 1  # include/uapi/linux/prctl.h
EOF_GRACE_S = 10.0  # after its console closes, QEMU gets this long to exit by itself
PANIC_MARK = "Kernel panic"
WARN_MARK = re.compile(r"WARNING: CPU: \d+ PID: \d+|BUG: ")  # kernel splats worth a mention
TERMINAL_JUNK = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|[^\[])|[\x00-\x08\x0b-\x1f\x7f]")  # SeaBIOS resets ttys


class Interrupted(BaseException):
    """A stop signal (SIGINT, SIGTERM, SIGHUP) arrived during a nested run; ``signum`` says which.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_held: list[int] | None = None  # while QEMU is being started: stop signals that arrived, for later


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within: the first SIGINT, SIGTERM or SIGHUP raises :class:`Interrupted` (main thread only).

    run_nested then kills QEMU, keeps what came back and returns Verdict.INTERRUPTED. The first
    signal puts the old handlers back, so a second one acts as it would without this (SIGINT:
    KeyboardInterrupt, SIGTERM/SIGHUP: death); QEMU dies with vmm either way (PR_SET_PDEATHSIG).
    A signal ignored on entry (nohup's SIGHUP, a background job's SIGINT) stays ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def stop(signum: int, frame: FrameType | None) -> None:
        restore()
        if _held is not None:
            _held.append(signum)
        else:
            raise Interrupted(signum)

    try:
        for s, handler in previous.items():
            if handler is not signal.SIG_IGN:
                signal.signal(s, stop)
        yield
    finally:
        restore()


@contextlib.contextmanager
def _holding_stop_signals() -> Iterator[None]:
    """Raise Interrupted only on the way out: a stop signal striking inside Popen (after the fork,
    before ``proc`` is assigned) would leave a QEMU nobody kills until vmm exits."""
    global _held
    _held = []
    try:
        yield
    finally:
        held, _held = _held, None
        if held:
            raise Interrupted(held[0])


def _qemu_opt(value: str) -> str:
    """A value for a QEMU ``key=value,...`` option list: a comma in it is written twice."""
    return value.replace(",", ",,")


def qemu_command(
    kernel: Path,
    accel_args: Sequence[str],
    cpu_args: Sequence[str],
    checkout: Path,
    results: Path,
    init: Path,
    memory: str = "4G",
    smp: int = 2,
) -> list[str]:
    """The qemu-system-x86_64 command line: serial console on stdio, host root over 9p."""
    append = " ".join(
        [
            "console=ttyS0",
            "panic=-1",
            "oops=panic",
            "loglevel=5",  # warnings and worse on the console
            "raid=noautodetect",  # md autodetect waits for every device probe; one boot hung right there
            # two NUMA nodes for guest_memfd_test's mbind/NUMA cases where CONFIG_NUMA_EMU is set (the 7.3
            # test kernel); a kernel without it ignores the option (6.12: one node, an expected skip)
            "numa=fake=2",
            "root=hostroot",
            "rootfstype=9p",
            f"rootflags=trans=virtio,version=9p2000.L,msize={MSIZE},cache=loose",
            "ro",
            f"init={init}",
        ]
    )
    virtfs = "local,security_model=none,multidevs=remap"
    cmd = [
        # -nodefaults: no IDE CD-ROM, floppy or VGA to probe; the serial console comes back by hand
        QEMU,
        "-m",
        memory,
        "-smp",
        str(smp),
        "-nodefaults",
        "-nographic",
        "-serial",
        "stdio",
        "-no-reboot",
        *accel_args,
        *cpu_args,
        "-kernel",
        str(kernel),
        "-append",
        append,
        "-virtfs",
        f"{virtfs},path=/,mount_tag=hostroot,readonly=on",
        "-virtfs",
        f"{virtfs},path={_qemu_opt(str(checkout))},mount_tag=checkout",
    ]
    if not is_inside(results, checkout):
        cmd += ["-virtfs", f"{virtfs},path={_qemu_opt(str(results))},mount_tag=results"]
    return cmd


def _pump(stream: IO[bytes], lines: queue.Queue[str | None]) -> None:
    """Reader thread: QEMU's stdout (the serial console) line by line into a queue, None at EOF."""
    for raw in iter(stream.readline, b""):
        lines.put(TERMINAL_JUNK.sub("", raw.decode("utf-8", "replace").rstrip("\r\n")))
    lines.put(None)


@dataclasses.dataclass
class _Boot:
    """What one QEMU process did, as seen on its console."""

    boot_s: float | None = None
    panic_line: str | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    timed_out: bool = False  # the overall deadline passed (not after a panic)
    hung_in_boot: bool = False  # no init within the boot timeout
    qemu_status: int | None = None  # None: killed
    stopped_by: int | None = None  # the signal that stopped the run (Interrupted), if one did


def _die_with_parent() -> Callable[[], None]:
    """A preexec_fn: the child gets SIGKILL when the thread that forks it (run_qemu's caller) dies."""
    parent, prctl = os.getpid(), ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: nobody would send the signal
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether QEMU has exited, without reaping it: until proc.wait() its pid, and so its process
    group id, cannot be reused, so killpg() cannot hit a stranger."""
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _end(proc: subprocess.Popen[bytes], wait_s: float) -> bool:
    """Give QEMU wait_s to exit, then SIGKILL its process group and reap it; True if it was still running."""
    try:
        end = time.monotonic() + wait_s
        while time.monotonic() < end and not _exited(proc):
            time.sleep(0.05)
    finally:  # even when a second Ctrl-C lands in the wait
        running = not _exited(proc)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # QEMU (or a zombie of it) and anything left in its group
        except ProcessLookupError:
            pass
        proc.wait()
    return running


def run_qemu(
    cmd: Sequence[str], deadline: float, boot_timeout_s: float, echo: Callable[[str], None], log: IO[str]
) -> _Boot:
    """Run QEMU once: stream its console to echo and log, watch for init/panic, enforce deadlines.

    An :class:`Interrupted` raised meanwhile (see nested.stop_on_signals) kills QEMU at once and is
    reported in ``stopped_by``; any other exception kills QEMU at once and propagates.
    """
    start = time.monotonic()
    res, powering_off, eof = _Boot(), False, False
    lines: queue.Queue[str | None] = queue.Queue()
    proc: subprocess.Popen[bytes] | None = None
    reader: threading.Thread | None = None
    try:
        with _holding_stop_signals():
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                process_group=0,
                preexec_fn=_die_with_parent(),
            )
        reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
        reader.start()
        while True:
            now = time.monotonic()
            if res.boot_s is None and res.panic_line is None and now - start > boot_timeout_s:
                res.hung_in_boot = True
                echo(f"vmm-nested: init did not start within {boot_timeout_s:.0f} s: killing QEMU")
                break
            if now >= deadline:
                res.timed_out = res.panic_line is None
                echo(f"vmm-nested: {'timeout' if res.timed_out else 'after the panic'}: killing QEMU")
                break
            try:
                line = lines.get(timeout=min(deadline - now, 1.0))
            except queue.Empty:
                continue
            if line is None:
                eof = True
                break
            echo(line)
            log.write(line + "\n")
            if res.boot_s is None and INIT_MARK in line:
                res.boot_s = time.monotonic() - start
            elif WARN_MARK.search(line):
                res.warnings.append(line.strip())
            elif POWEROFF_MARK in line:
                powering_off = True
            elif PANIC_MARK in line and res.panic_line is None and not powering_off:
                res.panic_line = line.strip()
                # panic=-1 + -no-reboot ends QEMU; allow the backtrace, not forever
                deadline = min(deadline, time.monotonic() + 30)
    except Interrupted as e:
        res.stopped_by = e.signum
    finally:
        # only a closed console means QEMU is on its way out; a deadline, a signal or an exception
        # here (echo failing, a second Ctrl-C) ends it at once
        if proc is not None:
            killed = _end(proc, EOF_GRACE_S if eof else 0.0)
            res.qemu_status = None if killed else proc.returncode
        if reader is not None:
            reader.join(timeout=5)  # every writer of the pipe is gone: EOF follows
        while not eof:  # keep in the log what QEMU printed that the loop did not get to
            try:
                rest = lines.get_nowait()
            except queue.Empty:
                break
            if rest is None:
                break
            log.write(rest + "\n")
    if res.stopped_by is not None:
        note = f"vmm-nested: stopped by {signal.Signals(res.stopped_by).name}: QEMU killed"
        log.write(note + "\n")
        try:
            echo(note)
        except OSError:  # after SIGHUP the terminal may be gone
            pass
    return res
