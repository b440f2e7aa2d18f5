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
* tag ``results``: the results folder (default ``<checkout>/results/nested``), writable, same
  path; only shared separately when it is not inside the checkout.

The results folder: vmm deletes only what it wrote there. A folder it creates, or finds empty, gets
a marker file (``.vmm-nested``) listing what each run added (vmm's own files and whatever the guest
wrote); the next run deletes exactly those files, so stale results cannot pass, and leaves anything
else alone. A non-empty folder without the marker is refused (a mistyped --results must not wipe a
user's files), except one holding only the files an older vmm wrote there (its init.sh says so).
The marker is flock()ed for the run: two runs cannot share a folder. Files put there during a run
count as the run's. After a SIGKILLed run, what the guest wrote there besides vmm's fixed files is
not listed, so it is kept.

The read-only root is mounted ``cache=loose`` (fast; nothing changes it during a run). The
writable shares use ``cache=mmap`` ($VMM_NESTED_9P_CACHE overrides): file data is cached but
names and attributes are not, so files the host adds during a run are seen (with ``loose``,
Python's import cache went stale and a test module added mid-run failed to import). Guest writes
reach the host at the latest at the ``sync`` before power-off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import os
import shlex
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import IO

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
from .init import ANCHOR_READY, INIT_HEADER, INIT_MARK, POWEROFF_MARK, guest_env, init_script
from .qemu import QEMU_ENV, STOP_SIGNALS, Interrupted, qemu_command, run_qemu, stop_on_signals

__all__ = [
    "ANCHOR_READY",
    "INIT_MARK",
    "POWEROFF_MARK",
    "RESULTS_MARKER",
    "STOP_SIGNALS",
    "Interrupted",
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
    "exit_code",
    "stop_on_signals",
    "summary",
]


class Verdict(str, enum.Enum):
    """How a nested run ended, from best to worst."""

    PASSED = "passed"
    TESTS_FAILED = "tests-failed"
    KERNEL_PANIC = "kernel-panic"
    TIMEOUT = "timeout"
    NO_RESULT = "no-result"
    INTERRUPTED = "interrupted"  # a stop signal (see stop_on_signals) ended the run


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
    stop_signal: int | None = None  # the signal that stopped the run (Verdict.INTERRUPTED)


RESULTS_MARKER = ".vmm-nested"  # in a results folder vmm created or adopted: what its runs wrote there
RESULT_FILES = ("init.sh", "console.log", "exit-status", "nested.ktap", "nested-junit.xml")  # always vmm's
_MARKER_HEAD = "# vmm nested results folder: the next `vmm nested` run deletes the files listed below\n"


def _tree(folder: Path) -> set[str]:
    """Every file, symlink and folder below folder, as relative POSIX paths, the marker left out."""
    found: set[str] = set()
    for top, dirs, files in os.walk(folder):  # symlinks to folders are listed, not followed
        rel = PurePosixPath(Path(top).relative_to(folder))
        found.update((rel / name).as_posix() for name in (*dirs, *files))
    found.discard(RESULTS_MARKER)
    return found


def _delete_listed(results: Path, names: Iterable[str]) -> None:
    """Delete the listed files below results (never through a symlink); then listed folders left empty."""
    folders: list[Path] = []
    for name in names:
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts or name == RESULTS_MARKER:
            continue  # not vmm's to write: the marker is plain text anyone can edit
        path = results / rel
        if path.parent.resolve() != results / rel.parent:
            continue  # a symlink on the way leads out of the folder
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            folders.append(path)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # not empty: someone else's files are in it
            folder.rmdir()


def _written_by_old_vmm(results: Path, names: list[str]) -> bool:
    """Whether a folder without the marker holds only what vmm wrote before the marker existed."""
    if "init.sh" not in names or not set(names) <= set(RESULT_FILES):
        return False
    try:
        with (results / "init.sh").open(encoding="utf-8", errors="replace") as f:
            return INIT_HEADER in (f.readline().rstrip("\n"), f.readline().rstrip("\n"))
    except OSError:
        return False


@dataclasses.dataclass
class _ResultsFolder:
    """A results folder held for one run: its marker open and flock()ed, and what the run found there."""

    path: Path
    marker: IO[str]
    before: set[str]  # after the clean-up, before the run
    leftover: set[str]  # listed as vmm's but not deletable (a folder someone put files in)

    def _write_marker(self, names: Iterable[str]) -> None:
        self.marker.seek(0)
        self.marker.truncate()
        self.marker.write(_MARKER_HEAD + "".join(f"{n}\n" for n in sorted(names) if "\n" not in n))
        self.marker.flush()

    def release(self) -> None:
        """List in the marker what this run added (the next run deletes exactly that), and unlock."""
        try:
            now = _tree(self.path)
            self._write_marker((now - self.before) | (self.leftover & now))
        finally:
            self.marker.close()  # drops the flock


def _prepare_results(results: Path, checkout: Path) -> _ResultsFolder:
    """Claim the results folder for a run: create or adopt it, lock it, delete what earlier runs wrote.

    Refused: the root, home or checkout (or a folder holding the checkout), anything but a folder,
    a non-empty folder vmm did not create (no marker), a folder another run holds, and a path the
    kernel command line cannot carry (``init=<results>/init.sh``). Call release() when the run ends.
    """
    results = results.resolve()  # _delete_listed compares resolved parents with it
    if results in (Path("/"), Path.home(), checkout) or is_inside(checkout, results):
        raise VmmError(f"refusing to use {results} as the nested results folder (it holds the checkout or more)")
    if any(c.isspace() or c == '"' or not c.isprintable() for c in str(results)):
        raise VmmError(
            f"refusing results folder {results!r}: the kernel command line (init=...) cannot carry "
            "blanks, quotes or control characters; pass --results with a plain path"
        )
    if results.exists() and not results.is_dir():
        raise VmmError(f"refusing to use {results} as the nested results folder: it is not a folder")
    results.mkdir(parents=True, exist_ok=True)
    marker_path = results / RESULTS_MARKER
    if not marker_path.is_file():
        names = sorted(os.listdir(results))
        if names and not _written_by_old_vmm(results, names):
            raise VmmError(
                f"refusing to use {results} as the nested results folder: it holds files vmm did not write "
                f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); give a new or empty folder"
            )
    marker = marker_path.open("a+", encoding="utf-8")
    try:
        fcntl.flock(marker, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        marker.close()
        raise VmmError(f"{results} is in use by another `vmm nested` run; give another --results folder")
    try:
        marker.seek(0)
        listed = {ln for ln in marker.read().splitlines() if ln and not ln.startswith("#")}
        _delete_listed(results, listed | set(RESULT_FILES))
        before = _tree(results)
        folder = _ResultsFolder(results, marker, before, listed & before)
        folder._write_marker(folder.leftover)
    except BaseException:
        marker.close()
        raise
    return folder


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

    A stop signal (under :func:`stop_on_signals`) kills QEMU and returns Verdict.INTERRUPTED with
    whatever came back by then.
    """
    if shutil.which(qemu.QEMU) is None:
        raise VmmError(f"{qemu.QEMU} not found: install it (apt-get install qemu-system-x86) or set ${QEMU_ENV}")
    checkout = Path(checkout).resolve()
    results = Path(results).resolve() if results else checkout / "results" / "nested"
    kernel = Path(kernel).resolve()
    if not kernel.is_file():
        raise VmmError(f"kernel {kernel} does not exist; {BUILD_HINT}")
    if command is not None and (pytest_args or not command.strip()):
        raise VmmError("a nested command replaces pytest: give a non-empty command or pytest arguments, not both")
    accel_args, cpu_args, accel_desc = choose_accel(accel)
    folder = _prepare_results(results, checkout)
    try:
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
        run, attempt, stopped = qemu._Boot(), 0, None
        with console.open("w", encoding="utf-8", buffering=1) as log:  # line-buffered: tail -f works
            try:
                for attempt in (1, 2):
                    run = run_qemu(cmd, start + timeout_s, boot_timeout_s, echo, log)
                    stopped = run.stopped_by
                    if stopped is not None or not run.hung_in_boot or attempt == 2:
                        break
                    echo("vmm-nested: retrying the boot once")
                    log.write("vmm-nested: retrying the boot once\n")
            except Interrupted as e:  # between boots or in run_qemu's clean-up: QEMU is dead already
                stopped = e.signum
        wall_s = time.monotonic() - start

        exit_status: int | None = None
        try:
            exit_status = int(status.read_text().strip())
        except (OSError, ValueError):
            pass
    finally:
        folder.release()
    if stopped is not None:
        verdict = Verdict.INTERRUPTED
    elif run.panic_line:
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
        stop_signal=stopped,
    )


EXIT_CODES = {Verdict.PASSED: 0, Verdict.TESTS_FAILED: 1}  # interrupted: 128 + signal; everything else: 3


def exit_code(res: NestedResult) -> int:
    """`vmm nested`'s exit status for a run: 0 passed, 1 tests failed, 128+N stopped by signal N, else 3."""
    if res.verdict is Verdict.INTERRUPTED and res.stop_signal is not None:
        return 128 + res.stop_signal
    return EXIT_CODES.get(res.verdict, 3)


def summary(res: NestedResult) -> str:
    """One line for the user: verdict, time, boot time, accelerator."""
    accel = res.accel.split()[0]
    boot = f"boot {res.boot_s:.0f} s" if res.boot_s is not None else "never booted to init"
    timing = f"in {res.wall_s:.0f} s ({boot}, accel {accel})"
    if res.verdict is Verdict.PASSED:
        return f"nested: PASSED {timing}"
    if res.verdict is Verdict.INTERRUPTED:
        name = signal.Signals(res.stop_signal).name if res.stop_signal is not None else "a signal"
        return f"nested: STOPPED by {name}, QEMU killed, {timing}"
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
