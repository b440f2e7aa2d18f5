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
import os
import queue
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from .errors import VmmError

CHECKOUT = Path(__file__).resolve().parent.parent
KERNEL_ENV = "VMM_TEST_KERNEL"
BUILD_HINT = "build one with scripts/build-test-kernel (about 20 min on 2 cores) or pass --kernel PATH"
SHARED_KERNEL = Path("..") / "shared" / "kernels" / "bzImage-6.12-swprot"
QEMU = "qemu-system-x86_64"
MSIZE = 512000  # 9p message size: the virtio transport's maximum in 6.12
INIT_MARK = "vmm-nested: init started"
POWEROFF_MARK = "vmm-nested: powering off"
PANIC_MARK = "Kernel panic"
WARN_MARK = re.compile(r"WARNING: CPU: \d+ PID: \d+|BUG: ")  # kernel splats worth a mention
TERMINAL_JUNK = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|[^\[])|[\x00-\x08\x0b-\x1f\x7f]")  # SeaBIOS resets ttys
CHECKOUT_CACHE = os.environ.get("VMM_NESTED_9P_CACHE", "mmap")  # 9p cache mode of the writable shares
POWER_OFF_PY = "import ctypes; ctypes.CDLL(None).reboot(0x4321fedc)"  # LINUX_REBOOT_CMD_POWER_OFF
# Under TCG, KVM's VM create/destroy flips static keys (preempt_notifier_key is patched inside
# __schedule) and one such text_poke raced with the other vCPU: "Oops: int3" in __schedule, a
# panic 490 s into a full run. A VM held open for the whole run (one with a vCPU and no in-kernel
# irqchip, one with both) keeps preempt_notifier_key, kvm_has_noapic_vcpu and apic_sw_disabled
# enabled, so the suite's VMs never patch kernel text.
ANCHOR_READY = "/run/vmm-anchor-vm"
ANCHOR_PY = f"""import fcntl, os, signal
kvm = os.open('/dev/kvm', os.O_RDWR)
vms = [fcntl.ioctl(kvm, 0xAE01, 0) for _ in range(2)]  # KVM_CREATE_VM
fcntl.ioctl(vms[1], 0xAE60, 0)  # KVM_CREATE_IRQCHIP
vcpus = [fcntl.ioctl(vm, 0xAE41, 0) for vm in vms]  # KVM_CREATE_VCPU
open('{ANCHOR_READY}', 'w').close()
signal.pause()
"""
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


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


def cache_dir() -> Path:
    """Where scripts/build-test-kernel keeps sources, objects and the built kernel."""
    if os.environ.get("VMM_CACHE_DIR"):
        return Path(os.environ["VMM_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vmm"


def cached_kernel() -> Path:
    """The path scripts/build-test-kernel installs its bzImage to."""
    return cache_dir() / "kernels" / "bzImage"


def find_kernel(explicit: str | os.PathLike[str] | None, *, checkout: Path = CHECKOUT) -> Path:
    """Pick the test kernel: --kernel, $VMM_TEST_KERNEL, the cached build, ../shared/kernels."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise VmmError(f"kernel {path} (--kernel) does not exist; {BUILD_HINT}")
        return path
    env = os.environ.get(KERNEL_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise VmmError(f"kernel {path} (${KERNEL_ENV}) does not exist; {BUILD_HINT}")
        return path
    for path in (cached_kernel(), (checkout / SHARED_KERNEL).resolve()):
        if path.is_file():
            return path
    raise VmmError(
        f"no test kernel found (tried --kernel, ${KERNEL_ENV}, {cached_kernel()}, "
        f"{checkout / SHARED_KERNEL}); {BUILD_HINT}"
    )


def nested_virt_available() -> tuple[bool, str]:
    """Whether QEMU with -accel kvm can give its guest VMX/SVM (so the guest gets a /dev/kvm)."""
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError as e:
        return False, f"/dev/kvm not usable: {os.strerror(e.errno or 0)}"
    try:
        flags: set[str] = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.partition(":")[2].split())
    except OSError as e:
        return False, f"cannot read /proc/cpuinfo: {e.strerror}"
    provider = next((m for m in ("kvm_pvm", "kvm_intel", "kvm_amd") if Path("/sys/module", m).exists()), "?")
    if "vmx" in flags:
        module = "kvm_intel"
    elif "svm" in flags:
        module = "kvm_amd"
    else:
        return False, f"host CPU exposes neither vmx nor svm (/dev/kvm is served by {provider})"
    param = Path("/sys/module", module, "parameters", "nested")
    try:
        value = param.read_text().strip()
    except OSError:
        return False, f"{module} is not loaded (/dev/kvm is served by {provider}), so no nested virtualization"
    if value in ("Y", "y", "1"):
        return True, f"{module} nested={value}"
    return False, f"{module} nested={value}: enable with 'modprobe {module} nested=1'"


def choose_accel(accel: str = "auto") -> tuple[list[str], list[str], str]:
    """QEMU accelerator and CPU arguments plus a description; auto prefers nested KVM over TCG."""
    if accel == "auto":
        ok, why = nested_virt_available()
        accel = "kvm" if ok else "tcg"
        note = f"auto: {why}"
    else:
        note = "requested"
    if accel == "kvm":
        return ["-accel", "kvm"], ["-cpu", "host"], f"kvm ({note})"
    if accel == "tcg":
        # single-threaded TCG: QEMU 7.2's multi-threaded TCG races the kernel's int3-based text
        # patching (int3 oopses seen at boot and mid-suite), which round-robin TCG cannot
        return ["-accel", "tcg,thread=single"], ["-cpu", "max"], f"tcg ({note})"
    raise VmmError(f"unknown accelerator {accel!r}: use auto, kvm or tcg")


def guest_python(checkout: Path) -> Path:
    """The interpreter to run inside: the checkout's venv, else this one (both visible via 9p)."""
    venv = checkout / ".venv" / "bin" / "python"
    return venv if venv.exists() else Path(sys.executable)


def ktap_plugin_args(python: Path, checkout: Path) -> list[str] | None:
    """Arguments that make pytest accept --ktap (already loaded, or -p vmm.ktap); None if impossible."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    for extra in ([], ["-p", "vmm.ktap"]):
        if extra and not (checkout / "vmm" / "ktap.py").exists():
            continue
        try:
            out = subprocess.run(
                [str(python), "-m", "pytest", *extra, "--noconftest", "-p", "no:cacheprovider", "--help"],
                cwd=checkout, env=env, capture_output=True, text=True, timeout=120,
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return None
        if "--ktap" in out:
            return extra
    return None


def _is_inside(path: Path, parent: Path) -> bool:
    """Whether path is parent or below it."""
    return path == parent or parent in path.parents


def _host_cache() -> Path:
    """The host's per-user vmm cache (kernel headers live there); visible read-only in the guest."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vmm"


def guest_env(checkout: Path, python: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of the init script and pytest inside the guest."""
    env = {
        "PATH": f"{python.parent}:{GUEST_PATH}",
        "HOME": "/tmp",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "VMM_NESTED": "1",  # the e2e test skips on it: a nested run must not start another
        "VMM_REQUIRE_PRIVATE_MEM": "1",  # private-memory skips become failures in there
        "PYTHONDONTWRITEBYTECODE": "1",  # the root is read-only
        "PYTHONUNBUFFERED": "1",  # console output in order, even if the kernel dies
    }
    if python.parent.parent == checkout / ".venv":
        env["VIRTUAL_ENV"] = str(checkout / ".venv")
    headers = _host_cache() / "headers-6.12" / "include"
    if (headers / "linux" / "kvm.h").is_file():  # HOME is /tmp inside: point at the host's cache
        env["VMM_KERNEL_HEADERS"] = str(headers)
    env.update(extra or {})
    return env


def init_script(checkout: Path, results: Path, python: Path, pytest_args: Sequence[str],
                env: Mapping[str, str], command: str | None = None) -> str:
    """The guest's PID 1: mount, run pytest (or the shell ``command``), record its exit code, power off."""
    q = shlex.quote
    opts = f"trans=virtio,version=9p2000.L,msize={MSIZE},cache={CHECKOUT_CACHE}"
    lines = [
        "#!/bin/sh",
        "# Generated by vmm/nested.py: PID 1 of the nested test kernel.",
        *(f"export {k}={q(v)}" for k, v in env.items()),
        f"echo {q(INIT_MARK)}",
        # reboot(2) powers off at once; sysrq o is asynchronous (commands after it race the shutdown)
        "poweroff() { sync; echo " + q(POWEROFF_MARK) + f"; {q(str(python))} -S -c {q(POWER_OFF_PY)};"
        " echo o > /proc/sysrq-trigger; while :; do sleep 1; done; }",
        'fail() { echo "vmm-nested: error: $*"; poweroff; }',
        "mount -t proc proc /proc || fail 'mount /proc'",
        "mount -t sysfs sysfs /sys || fail 'mount /sys'",
        "mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev || fail 'mount /dev'",
        "mkdir -p /dev/shm /dev/pts",
        "mount -t tmpfs -o mode=1777 tmpfs /dev/shm",
        "mount -t devpts devpts /dev/pts",
        "mount -t tmpfs -o mode=1777 tmpfs /tmp || fail 'mount /tmp'",
        "mount -t tmpfs -o mode=755 tmpfs /run || fail 'mount /run'",
        "mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null",
        "mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null",
        f"mkdir -p {q(str(checkout))} 2>/dev/null",
        f"mount -t 9p -o {opts} checkout {q(str(checkout))} || fail 'mount checkout'",
    ]
    if not _is_inside(results, checkout):
        lines += [f"mkdir -p {q(str(results))} 2>/dev/null",
                  f"mount -t 9p -o {opts} results {q(str(results))} || fail 'mount results'"]
    run = command if command is not None else shlex.join([str(python), "-m", "pytest", *pytest_args])
    lines += [
        # the anchor VMs pin KVM's static keys (see ANCHOR_PY); started once the checkout (and so the
        # venv's python, which may live under the guest's fresh /tmp) is mounted, waited for below
        f"( {q(str(python))} -S -c {q(ANCHOR_PY)} || echo 'vmm-nested: warning: no anchor VM'; : > {ANCHOR_READY} ) &",
        f"cd {q(str(checkout))} || fail 'cd checkout'",
        f"i=0; while [ ! -e {ANCHOR_READY} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done",
        "echo \"vmm-nested: $(uname -r), $(nproc) CPUs, /dev/kvm: $(ls /dev/kvm 2>&1)\"",
        f"echo 'vmm-nested: running:' {q(run)}",
        run if command is None else f"( {command}\n)",  # a subshell: `exit` in the command ends only it
        "rc=$?",
        f"echo $rc > {q(str(results / 'exit-status'))}",
        f'echo "vmm-nested: {"pytest" if command is None else "command"} exit status $rc"',
        "poweroff",
        "",
    ]
    return "\n".join(lines)


def qemu_command(kernel: Path, accel_args: Sequence[str], cpu_args: Sequence[str], checkout: Path,
                 results: Path, init: Path, memory: str = "4G", smp: int = 2) -> list[str]:
    """The qemu-system-x86_64 command line: serial console on stdio, host root over 9p."""
    append = " ".join([
        "console=ttyS0", "panic=-1", "oops=panic", "loglevel=5",  # warnings and worse on the console
        "raid=noautodetect",  # md autodetect waits for every device probe; one boot hung right there
        "root=hostroot", "rootfstype=9p", f"rootflags=trans=virtio,version=9p2000.L,msize={MSIZE},cache=loose",
        "ro", f"init={init}",
    ])
    virtfs = "local,security_model=none,multidevs=remap"
    cmd = [
        # -nodefaults: no IDE CD-ROM, floppy or VGA to probe; the serial console comes back by hand
        QEMU, "-m", memory, "-smp", str(smp), "-nodefaults", "-nographic", "-serial", "stdio", "-no-reboot",
        *accel_args, *cpu_args, "-kernel", str(kernel), "-append", append,
        "-virtfs", f"{virtfs},path=/,mount_tag=hostroot,readonly=on",
        "-virtfs", f"{virtfs},path={checkout},mount_tag=checkout",
    ]
    if not _is_inside(results, checkout):
        cmd += ["-virtfs", f"{virtfs},path={results},mount_tag=results"]
    return cmd


def _prepare_results(results: Path, checkout: Path) -> None:
    """Empty the results folder (refusing obviously wrong ones) so stale files can't pass."""
    if results in (Path("/"), Path.home(), checkout) or _is_inside(checkout, results):
        raise VmmError(f"refusing to use {results} as the nested results folder (it is cleaned each run)")
    if results.exists():
        shutil.rmtree(results)
    results.mkdir(parents=True)


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


def _boot(cmd: Sequence[str], deadline: float, boot_timeout_s: float, echo: Callable[[str], None],
          log: IO[str]) -> _Boot:
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


def run_nested(kernel: Path, accel: str = "auto", timeout_s: float = 1800.0,
               pytest_args: Sequence[str] = (), checkout: Path = CHECKOUT, results: Path | None = None,
               echo: Callable[[str], None] = print, extra_env: Mapping[str, str] | None = None,
               memory: str = "4G", smp: int = 2, boot_timeout_s: float = 120.0,
               command: str | None = None) -> NestedResult:
    """Boot kernel under QEMU, run pytest inside on the checkout, and collect what came back.

    ``command``: a shell command line to run instead of pytest (in the checkout, with the venv's
    bin/ first on PATH), e.g. a benchmark; ``pytest_args`` must then be empty, and no KTAP or
    JUnit file is written.

    A boot that never reaches init (seen once in ~20 TCG boots on a loaded host) is retried once:
    no test has run yet, so a retry hides nothing.
    """
    if shutil.which(QEMU) is None:
        raise VmmError(f"{QEMU} not found: install it (apt-get install qemu-system-x86)")
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
            echo("vmm-nested: pytest has no --ktap option here (vmm.ktap missing?): no KTAP file")
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
            run = _boot(cmd, start + timeout_s, boot_timeout_s, echo, log)
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
        verdict=verdict, exit_status=exit_status, wall_s=wall_s, boot_s=run.boot_s,
        ktap=ktap if ktap.is_file() else None, junit=junit if junit.is_file() else None,
        console_log=console, accel=accel_desc, panic_line=run.panic_line, qemu_status=run.qemu_status,
        kernel_warnings=run.warnings, boot_attempts=attempt, command=command,
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


def main_nested(kernel: str | None, accel: str = "auto", timeout: float = 1800.0,
                pytest_args: Sequence[str] = (), command: str | None = None,
                results: str | os.PathLike[str] | None = None) -> int:
    """Everything `vmm nested` does; returns 0 passed, 1 tests (or the command) failed, 2 setup
    error, 3 otherwise."""
    def echo(line: str) -> None:
        print(line, flush=True)

    try:
        path = find_kernel(kernel)
        res = run_nested(path, accel, timeout, pytest_args, echo=echo, command=command,
                         results=Path(results) if results else None)
    except VmmError as e:
        print(f"nested: error: {e}", file=sys.stderr)
        return 2
    print(summary(res))
    if res.boot_attempts > 1:
        print("  the first boot hung before init and was retried")
    for line in res.kernel_warnings:
        print(f"  kernel: {line}")
    files = [("console", res.console_log)]
    if command is None:
        files[:0] = [("ktap", res.ktap), ("junit", res.junit)]
    for label, path in files:
        print(f"  {label}: {path if path else 'missing'}")
    return EXIT_CODES.get(res.verdict, 3)
