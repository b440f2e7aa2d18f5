"""Nested-virt runner: boot a test kernel under QEMU and run the vmm pytest suite inside it.

Why: private memory (KVM_X86_SW_PROTECTED_VM, KVM_SET_MEMORY_ATTRIBUTES) is missing on the
development hosts, so the suite runs again inside a 6.12 kernel that has it (REFERENCE.md §2).

Layout inside the guest (all 9p over virtio, ``security_model=none``):

* tag ``hostroot``: the host's ``/``, read-only, is the guest's root file system, so the host's
  Python, the venv's interpreter symlink and every library resolve at the same paths;
* tag ``checkout``: the checkout, writable, mounted over its own (read-only) path, so
  ``<checkout>/.venv`` and ``.hypothesis/`` work; no tmpfs/overlay trick is needed because the
  mount point already exists in the read-only root (only under /tmp, which gets a fresh tmpfs,
  is the mount point created first);
* tag ``results``: the results folder (default ``<checkout>/results/nested``, emptied each run),
  writable, same path; only shared separately when it is not inside the checkout.

The read-only root is mounted ``cache=loose`` (fast; nothing changes it during a run). The
writable shares use ``cache=mmap`` ($VMM_NESTED_9P_CACHE overrides): file data is cached but
names and attributes are not, so files the host adds during a run are seen (with ``loose``,
Python's import cache went stale and a test module added mid-run failed to import). Guest writes
reach the host at the latest at the ``sync`` before power-off.
"""

from __future__ import annotations

import dataclasses
import enum
import shlex
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from vmm.errors import VmmError
from vmm.paths import CHECKOUT

from . import host, qemu
from .host import (
    BUILD_HINT,
    cached_kernel,
    choose_accel,
    find_kernel,
    guest_python,
    is_inside,
    ktap_plugin_args,
    nested_virt_available,
)
from .init import ANCHOR_READY, INIT_MARK, POWEROFF_MARK, guest_env, init_script
from .qemu import qemu_command, run_qemu

__all__ = [
    "ANCHOR_READY",
    "INIT_MARK",
    "POWEROFF_MARK",
    "NestedResult",
    "Verdict",
    "cached_kernel",
    "choose_accel",
    "find_kernel",
    "guest_env",
    "host",
    "init_script",
    "nested_virt_available",
    "qemu",
    "qemu_command",
    "run_nested",
    "run_qemu",
    "summary",
]


class Verdict(str, enum.Enum):
    """How a nested run ended, from best to worst."""

    PASSED = "passed"
    TESTS_FAILED = "tests-failed"
    KERNEL_PANIC = "kernel-panic"
    TIMEOUT = "timeout"
    NO_RESULT = "no-result"


@dataclasses.dataclass
class NestedResult:
    """Outcome of one nested run: verdict, pytest's exit status, timings and result files."""

    verdict: Verdict
    exit_status: int | None  # pytest's (or the command's) exit code inside; None when it never came back
    wall_s: float  # first QEMU start to last QEMU exit
    boot_s: float | None  # QEMU start to the init script's first line (of the boot that got there)
    ktap: Path | None  # None when pytest (or the ktap plugin) did not write it
    junit: Path | None
    console_log: Path
    accel: str  # description from choose_accel()
    panic_line: str | None = None
    qemu_status: int | None = None  # QEMU's own exit status (None when it had to be killed)
    kernel_warnings: list[str] = dataclasses.field(default_factory=list)  # WARNING:/BUG: lines
    boot_attempts: int = 1  # 2 when the first boot hung before init and was retried
    command: str | None = None  # the shell command run instead of pytest, if any


def _prepare_results(results: Path, checkout: Path) -> None:
    """Empty the results folder (refusing obviously wrong ones) so stale files can't pass."""
    if results in (Path("/"), Path.home(), checkout) or is_inside(checkout, results):
        raise VmmError(f"refusing to use {results} as the nested results folder (it is cleaned each run)")
    if results.exists():
        shutil.rmtree(results)
    results.mkdir(parents=True)


def run_nested(
    kernel: Path,
    accel: str = "auto",
    timeout_s: float = 1800.0,
    pytest_args: Sequence[str] = (),
    checkout: Path = CHECKOUT,
    results: Path | None = None,
    echo: Callable[[str], None] = print,
    extra_env: Mapping[str, str] | None = None,
    memory: str = "4G",
    smp: int = 2,
    boot_timeout_s: float = 120.0,
    command: str | None = None,
) -> NestedResult:
    """Boot kernel under QEMU, run pytest inside on the checkout, and collect what came back.

    ``command``: a shell command line to run instead of pytest (in the checkout, with the venv's
    bin/ first on PATH), e.g. a benchmark; ``pytest_args`` must then be empty, and no KTAP or
    JUnit file is written.

    A boot that never reaches init (seen once in ~20 TCG boots on a loaded host) is retried once:
    no test has run yet, so a retry hides nothing.
    """
    if shutil.which(qemu.QEMU) is None:
        raise VmmError(f"{qemu.QEMU} not found: install it (apt-get install qemu-system-x86)")
    checkout = Path(checkout).resolve()
    results = Path(results).resolve() if results else checkout / "results" / "nested"
    kernel = Path(kernel).resolve()
    if not kernel.is_file():
        raise VmmError(f"kernel {kernel} does not exist; {BUILD_HINT}")
    if command is not None and (pytest_args or not command.strip()):
        raise VmmError("a nested command replaces pytest: give a non-empty command or pytest arguments, not both")
    accel_args, cpu_args, accel_desc = choose_accel(accel)
    _prepare_results(results, checkout)
    python = guest_python(checkout)
    ktap, junit, status = results / "nested.ktap", results / "nested-junit.xml", results / "exit-status"
    args = list(pytest_args)
    if command is None:
        plugin = ktap_plugin_args(python, checkout)
        if plugin is not None:
            args += [*plugin, "--ktap", str(ktap)]
        else:
            echo("vmm-nested: pytest has no --ktap option here (vmm.tools.ktap missing?): no KTAP file")
        args += ["--junitxml", str(junit), "-p", "no:cacheprovider"]
    init = results / "init.sh"
    init.write_text(init_script(checkout, results, python, args, guest_env(checkout, python, extra_env), command))
    init.chmod(0o755)
    cmd = qemu_command(kernel, accel_args, cpu_args, checkout, results, init, memory, smp)
    console = results / "console.log"
    echo(f"vmm-nested: {shlex.join(cmd)}")

    start = time.monotonic()
    with console.open("w", encoding="utf-8", buffering=1) as log:  # line-buffered: tail -f works
        for attempt in (1, 2):
            run = run_qemu(cmd, start + timeout_s, boot_timeout_s, echo, log)
            if not run.hung_in_boot or attempt == 2:
                break
            echo("vmm-nested: retrying the boot once")
            log.write("vmm-nested: retrying the boot once\n")
    wall_s = time.monotonic() - start

    exit_status: int | None = None
    try:
        exit_status = int(status.read_text().strip())
    except (OSError, ValueError):
        pass
    if run.panic_line:
        verdict = Verdict.KERNEL_PANIC
    elif run.timed_out or run.hung_in_boot:
        verdict = Verdict.TIMEOUT
    elif exit_status is None:
        verdict = Verdict.NO_RESULT
    else:
        verdict = Verdict.PASSED if exit_status == 0 else Verdict.TESTS_FAILED
    return NestedResult(
        verdict=verdict,
        exit_status=exit_status,
        wall_s=wall_s,
        boot_s=run.boot_s,
        ktap=ktap if ktap.is_file() else None,
        junit=junit if junit.is_file() else None,
        console_log=console,
        accel=accel_desc,
        panic_line=run.panic_line,
        qemu_status=run.qemu_status,
        kernel_warnings=run.warnings,
        boot_attempts=attempt,
        command=command,
    )


EXIT_CODES = {Verdict.PASSED: 0, Verdict.TESTS_FAILED: 1}  # everything else: 3


def summary(res: NestedResult) -> str:
    """One line for the user: verdict, time, boot time, accelerator."""
    accel = res.accel.split()[0]
    boot = f"boot {res.boot_s:.0f} s" if res.boot_s is not None else "never booted to init"
    timing = f"in {res.wall_s:.0f} s ({boot}, accel {accel})"
    if res.verdict is Verdict.PASSED:
        return f"nested: PASSED {timing}"
    if res.verdict is Verdict.TESTS_FAILED:
        if res.command is not None:
            return f"nested: FAILED: the command failed (exit status {res.exit_status}) {timing}"
        return f"nested: FAILED: tests failed (pytest exit status {res.exit_status}) {timing}"
    why = {
        Verdict.KERNEL_PANIC: f"kernel panic ({res.panic_line})",
        Verdict.TIMEOUT: "timeout" if res.boot_s is not None else "timeout: init never started",
        Verdict.NO_RESULT: f"no result came back (QEMU exit status {res.qemu_status}; see {res.console_log})",
    }[res.verdict]
    return f"nested: FAILED: {why} {timing}"
