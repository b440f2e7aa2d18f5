"""Driving QEMU: the command line, and one boot watched on its serial console."""

from __future__ import annotations

import dataclasses
import queue
import re
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from .host import is_inside
from .init import INIT_MARK, MSIZE, POWEROFF_MARK

QEMU = "qemu-system-x86_64"
PANIC_MARK = "Kernel panic"
WARN_MARK = re.compile(r"WARNING: CPU: \d+ PID: \d+|BUG: ")  # kernel splats worth a mention
TERMINAL_JUNK = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|[^\[])|[\x00-\x08\x0b-\x1f\x7f]")  # SeaBIOS resets ttys


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
        f"{virtfs},path={checkout},mount_tag=checkout",
    ]
    if not is_inside(results, checkout):
        cmd += ["-virtfs", f"{virtfs},path={results},mount_tag=results"]
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


def run_qemu(
    cmd: Sequence[str], deadline: float, boot_timeout_s: float, echo: Callable[[str], None], log: IO[str]
) -> _Boot:
    """Run QEMU once: stream its console to echo and log, watch for init/panic, enforce deadlines."""
    start = time.monotonic()
    res, powering_off, expired = _Boot(), False, False
    lines: queue.Queue[str | None] = queue.Queue()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    reader.start()
    try:
        while True:
            now = time.monotonic()
            if res.boot_s is None and res.panic_line is None and now - start > boot_timeout_s:
                expired = res.hung_in_boot = True
                echo(f"vmm-nested: init did not start within {boot_timeout_s:.0f} s: killing QEMU")
                break
            if now >= deadline:
                expired, res.timed_out = True, res.panic_line is None
                echo(f"vmm-nested: {'timeout' if res.timed_out else 'after the panic'}: killing QEMU")
                break
            try:
                line = lines.get(timeout=min(deadline - now, 1.0))
            except queue.Empty:
                continue
            if line is None:
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
    finally:
        if proc.poll() is None and not expired:
            try:  # console closed (or echo raised): give QEMU a moment to exit by itself
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        killed = proc.poll() is None
        if killed:
            proc.kill()
        status = proc.wait()
        res.qemu_status = None if killed else status
        reader.join(timeout=5)
    return res
