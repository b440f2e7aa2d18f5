"""The `vmm` command: doctor, boot, selftest, nested, bench. Click only: parse, call the library,
print. User mistakes end in one line on stderr and a documented exit code, never a traceback."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

import click

from vmm.errors import GuestAssertion, GuestError, GuestTimeout, VmmError
from vmm.guest import Machine, Ucall, UcallCmd, load_guest
from vmm.guest.layout import DATA_GPA
from vmm.kvm import Kvm
from vmm.kvm.caps import PRIVATE_MEM_REASON, auto_backing, private_memory
from vmm.kvm.uapi import Cap, ExitReason, GmemFlag, VmType, enum_name
from vmm.memory import HUGE_PAGE_SIZE, PAGE_SIZE, Backing
from vmm.paths import CHECKOUT

from . import doctor, nested
from .bench.cli import bench
from .units import human_size, parse_size

# exit codes of `vmm boot` (the guest's verdict) and of every usage error
EXIT_PASSED, EXIT_ASSERT, EXIT_USAGE, EXIT_UNEXPECTED, EXIT_TIMEOUT = 0, 1, 2, 3, 4
# tests that never touch /dev/kvm, or test only vmm's own logic, give the same answer inside: the
# nested run leaves them to the host (the hostile-guest and run-limit stress tests take minutes
# under TCG and would tell nothing new there)
SYNCS_SHOWN = 16  # SYNC lines in `vmm boot`'s report (a guest may SYNC thousands of times)
NESTED_DEFAULT_ARGS = ("-m", "not no_kvm and not host_only")


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print one line on stderr and exit with ``code``."""
    click.echo(f"vmm: {message}", err=True)
    sys.exit(code)


def _exit_summary(counts: list[int]) -> str:
    return ", ".join(f"{enum_name(ExitReason, i)} {c}" for i, c in enumerate(counts) if c) or "none"


def _exit_counts(m: Machine) -> list[int]:
    return [sum(col) for col in zip(*(r.exit_counts for r in m.runners))]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """vmm: a Python VMM harness over /dev/kvm for testing guest_memfd private memory."""


@cli.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor_cmd(as_json: bool) -> None:
    """Report KVM capabilities (on /dev/kvm and per VM type) and which selftests will run."""
    with Kvm() as kvm:
        r = doctor.report(kvm)
    click.echo(json.dumps(r, indent=2) if as_json else doctor.render(r))


BACKINGS = [b.value for b in Backing] + ["auto"]


def _check_backing(kvm: Kvm, backing: str, private: bool) -> None:
    """Refuse a --backing this host cannot give the VM type, naming the capability."""
    vm_type_name = "sw_protected" if private else "default"
    with kvm.create_vm(VmType.SW_PROTECTED if private else VmType.DEFAULT) as probe:
        if not probe.check_extension(Cap.GUEST_MEMFD):
            fail(
                f"--backing {backing} needs KVM_CAP_GUEST_MEMFD on a {vm_type_name} VM"
                + ("" if private else "; try --vm-type sw_protected")
            )
        flags = probe.check_extension(Cap.GUEST_MEMFD_FLAGS)
    both = GmemFlag.MMAP | GmemFlag.INIT_SHARED
    if backing == Backing.GUEST_MEMFD_ONLY and flags & both != both:
        fail("--backing guest_memfd-only needs GUEST_MEMFD_FLAG_MMAP|INIT_SHARED in KVM_CAP_GUEST_MEMFD_FLAGS")


def _finite_seconds(value: float) -> float:
    """--timeout's check beyond FloatRange (which lets nan and inf through): a finite number."""
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number of seconds.")
    return value


@cli.command()
@click.argument("guest_spec", metavar="GUEST", default="hello")
@click.option("--mem", "mem", default="4M", show_default=True, help="Guest memory (slot 0), e.g. 4M, 64M.")
@click.option("--vcpus", type=click.IntRange(1, 256), default=None, help="vCPUs (default: the guest's header).")
@click.option(
    "--backing",
    type=click.Choice(BACKINGS),
    default="auto",
    show_default=True,
    help="auto: guest_memfd-only when the host can mmap guest_memfd, else guest_memfd.",
)
@click.option(
    "--mode", type=click.Choice(["real", "long"]), default=None, help="CPU mode (default: the guest's header)."
)
@click.option(
    "--page-size", type=click.Choice(["4k", "2m"]), default="2m", show_default=True, help="Guest page tables."
)
@click.option("--arg", default="0", show_default=True, help="Value passed to the guest in rcx.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    callback=lambda ctx, param, value: _finite_seconds(value),
    default=10.0,
    show_default=True,
    help="Seconds for the whole run (every vCPU, all its SYNCs); then the guest is stopped (exit 4).",
)
@click.option(
    "--vm-type",
    type=click.Choice(["default", "sw_protected"]),
    default=None,
    help="KVM VM type (default: the guest's header); sw_protected adds private-capable memory.",
)
@click.option(
    "--private-mem",
    default="8M",
    show_default=True,
    help="With --vm-type sw_protected: memfd + guest_memfd region at 4 GiB, passed in rcx.",
)
def boot(
    guest_spec: str,
    mem: str,
    vcpus: int | None,
    backing: str,
    mode: str | None,
    page_size: str,
    arg: str,
    timeout: float,
    vm_type: str | None,
    private_mem: str,
) -> None:
    """Boot GUEST (a bundled name, a .S source or a flat binary) and print its report."""
    size = parse_size(mem)
    if size % PAGE_SIZE:
        fail(f"--mem {mem} is not a multiple of the page size ({PAGE_SIZE})")
    if size > _host_memory():
        fail(f"--mem {mem} is larger than this host's memory ({human_size(_host_memory())})")
    try:
        user_arg = int(arg, 0)
    except ValueError:
        fail(f"--arg {arg!r} is not a number")
    image = load_guest(guest_spec)
    private = (VmType[vm_type.upper()] if vm_type else image.vm_type) == VmType.SW_PROTECTED
    private_size = parse_size(private_mem)
    if private_size % HUGE_PAGE_SIZE or not private_size:
        fail(f"--private-mem {private_mem} is not a positive multiple of 2M")
    with Kvm() as kvm:
        if private and not private_memory(kvm):
            fail(
                f"this host's KVM lacks {PRIVATE_MEM_REASON}: run private-memory guests in the "
                "nested test kernel (`vmm nested`, see README)"
            )
        vm_private = private  # the VM type; `private` alone means the guest wants a private data region
        if backing == "auto":
            backing, vm_private = auto_backing(kvm, private)
        elif backing != Backing.SHARED:
            _check_backing(kvm, backing, private)
        n = vcpus or image.vcpus

        def show(vcpu_id: int, text: str) -> None:
            click.echo(f"guest[{vcpu_id}]: {text}" if n > 1 else f"guest: {text}")

        syncs: list[Ucall] = []
        sync_count = [0]
        click.echo(
            f"vmm: booting {image.name} ({len(image.binary)} bytes, {mode or image.mode.value} mode, "
            f"{n} vCPU{'s' if n > 1 else ''}, {human_size(size)} {backing}"
            f"{', KVM_X86_SW_PROTECTED_VM' if vm_private else ''})"
        )
        vm_kind = VmType.SW_PROTECTED if vm_private else VmType.DEFAULT
        with Machine(kvm=kvm, mem_size=size, vcpus=n, backing=backing, output=show, vm_type=vm_kind) as m:
            if private:
                m.add_private_memory(DATA_GPA, private_size)
                if m.converter is not None:
                    m.converter.start_accounting()  # the baseline the "private" bytes below count from
                if arg == "0":
                    user_arg = DATA_GPA

            def on_sync(uc: Ucall) -> None:
                # a guest may SYNC in a loop until --timeout: the report keeps the first few
                sync_count[0] += 1
                if len(syncs) < SYNCS_SHOWN:
                    syncs.append(uc)
                    if private:
                        _accounting(m, uc)

            m.load(image, mode=mode, arg=user_arg, page_size=PAGE_SIZE if page_size == "4k" else HUGE_PAGE_SIZE)
            start = time.monotonic()
            code, verdict = EXIT_PASSED, "passed (GUEST_DONE)"
            try:
                results = m.run_all(timeout, on_sync=on_sync)
                if any(not (isinstance(r, Ucall) and r.cmd == UcallCmd.DONE) for r in results):
                    code, verdict = EXIT_UNEXPECTED, "halted without GUEST_DONE"
            except GuestAssertion as e:
                code, verdict = EXIT_ASSERT, f"FAILED: {e}"
            except GuestTimeout as e:
                code, verdict = EXIT_TIMEOUT, f"TIMEOUT: {e}"
            except GuestError as e:  # UnexpectedExit, UcallError, MemoryFaultError: the guest's failure
                code, verdict = EXIT_UNEXPECTED, f"STOPPED: {e}"
            elapsed = time.monotonic() - start
            _report(m, image.name, verdict, elapsed, syncs, sync_count[0])
    sys.exit(code)


def _report(m: Machine, name: str, verdict: str, elapsed: float, syncs: list[Ucall], sync_count: int) -> None:
    """The guest's report: verdict, time and exits, the first SYNCs, memory held by each backing."""
    click.echo(f"--- {name}: {verdict}")
    click.echo(f"    time      {elapsed * 1000:.1f} ms, exits: {_exit_summary(_exit_counts(m))}")
    for s in syncs:
        click.echo(f"    sync      vCPU {s.vcpu_id} stage {s.stage} values {[hex(a) for a in s.args[1:] if a]}")
    if sync_count > len(syncs):
        click.echo(f"    sync      ... {sync_count - len(syncs)} more SYNCs not shown")
    region = m.memory.region_at(0)
    click.echo(
        f"    memory    slot 0: shared backing {human_size(region.shared_allocated())} allocated, "
        f"guest_memfd {human_size(region.private_allocated())} resident"
    )
    if m.converter is not None:
        st = m.converter.stats
        click.echo(
            f"    private   {st.conversions} conversions ({human_size(st.bytes_to_private)} to private, "
            f"{human_size(st.bytes_to_shared)} to shared); now shared "
            f"{human_size(m.converter.shared_allocated())}, private {human_size(m.converter.private_allocated())}"
        )


def _accounting(m: Machine, uc: Ucall) -> None:
    """Per-step line for private guests: bytes held by each backing, conversions, exits so far."""
    conv = m.converter
    assert conv is not None
    click.echo(
        f"    step {uc.stage}: shared {human_size(conv.shared_allocated())}, private "
        f"{human_size(conv.private_allocated())}, conversions {conv.stats.conversions}, "
        f"exits: {_exit_summary(_exit_counts(m))}"
    )


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("pytest_args", nargs=-1, type=click.UNPROCESSED)
def selftest(pytest_args: tuple[str, ...]) -> None:
    """Run the selftests on this host (arguments go to pytest).

    Without read/write access to /dev/kvm the tests that need it skip, each naming the missing
    access, and the others still run (a one-line note on stderr says so first)."""
    from vmm.paths import cache_dir

    tests = CHECKOUT / "selftests"
    if not tests.is_dir():
        fail(f"selftests not found at {tests} (run from a checkout)")
    try:
        Kvm().close()
    except VmmError as e:
        click.echo(f"vmm: {e}: the tests that need it will skip", err=True)
    # the whole suite unless the arguments name test files or directories themselves (pytest would run both)
    named = any(not a.startswith("-") and (CHECKOUT / a.split("::")[0]).exists() for a in pytest_args)
    cmd = [sys.executable, "-m", "pytest", *([] if named else [str(tests)]), *pytest_args]
    env = dict(os.environ)
    if not os.access(CHECKOUT, os.W_OK):  # a read-only checkout: pytest's and hypothesis's caches go elsewhere
        if not any("no:cacheprovider" in a for a in pytest_args):  # without it, cache_dir is an unknown option
            cmd += ["-o", f"cache_dir={cache_dir() / 'pytest'}"]
        env.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(cache_dir() / "hypothesis"))
    sys.exit(subprocess.call(cmd, cwd=CHECKOUT, env=env))


@cli.command("nested", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option(
    "--kernel", default=None, help="bzImage to boot (default: $VMM_TEST_KERNEL, cached build, ../shared/kernels)."
)
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto", show_default=True)
@click.option("--timeout", type=float, default=1800.0, show_default=True, help="Seconds for the whole nested run.")
@click.option(
    "--command",
    "command",
    default=None,
    metavar="SHELL_COMMAND",
    help="Run this shell command inside (in the checkout, venv first on PATH) instead of pytest.",
)
@click.option(
    "--results",
    default=None,
    metavar="DIR",
    help="Results folder [default: results/nested]. It must be new, empty, or one vmm made: vmm deletes only "
    "what its earlier runs wrote there (listed in DIR/.vmm-nested) and refuses a folder with other files.",
)
@click.argument("pytest_args", nargs=-1, type=click.UNPROCESSED)
def nested_cmd(
    kernel: str | None,
    accel: str,
    timeout: float,
    command: str | None,
    results: str | None,
    pytest_args: tuple[str, ...],
) -> None:
    """Boot a test kernel with KVM_X86_SW_PROTECTED_VM under QEMU and run the selftests (or a command) inside.

    Exit status: 0 passed, 1 tests (or the command) failed, 2 usage or set-up error (a refused
    results folder too), 3 the run itself failed (kernel panic, timeout, no result), 128+N stopped
    by signal N: 130 Ctrl-C (SIGINT), 129 SIGHUP, 143 SIGTERM. A stop kills QEMU at once and keeps
    what came back (console.log and any result files); a second signal gets the default action (vmm
    dies of it: still 128+N to a shell). QEMU never outlives vmm, even a SIGKILLed one. $VMM_QEMU
    names the QEMU binary to run instead of qemu-system-x86_64."""
    if command is not None and pytest_args:
        fail("--command replaces pytest: give pytest arguments or --command, not both")
    if command is None and not pytest_args:
        pytest_args = NESTED_DEFAULT_ARGS

    def echo(line: str) -> None:
        click.echo(line)

    try:
        with nested.stop_on_signals():
            path = nested.find_kernel(kernel)
            res = nested.run_nested(
                path,
                accel,
                timeout,
                list(pytest_args),
                echo=echo,
                command=command,
                results=Path(results) if results else None,
            )
    except nested.Interrupted as e:  # before QEMU started: nothing came back
        fail(f"stopped by {e}", 128 + e.signum)
    try:
        click.echo(nested.summary(res))
        if res.boot_attempts > 1:
            click.echo("  the first boot hung before init and was retried")
        for line in res.kernel_warnings:
            click.echo(f"  kernel: {line}")
        files: list[tuple[str, Path | None]] = [("console", res.console_log)]
        if command is None:
            files[:0] = [("ktap", res.ktap), ("junit", res.junit)]
        for label, file in files:
            click.echo(f"  {label}: {file if file else 'missing'}")
    except OSError:  # after SIGHUP the terminal may be gone; the exit status still tells
        if res.verdict is not nested.Verdict.INTERRUPTED:
            raise
    sys.exit(nested.exit_code(res))


cli.add_command(bench)


def _command_names(ctx: click.Context | None) -> list[str]:
    """The subcommands a usage error belongs to (["boot"], ["bench", "exits"]; [] for `vmm` itself)."""
    names: list[str] = []
    if ctx is not None:
        while ctx.parent is not None:
            names.append(ctx.info_name or "")
            ctx = ctx.parent
        return names[::-1]
    # some parse errors (e.g. "--json=3" on a flag) come without a context: read the command line
    command: click.Command = cli
    for arg in sys.argv[1:]:
        if isinstance(command, click.Group) and arg in command.commands:
            names.append(arg)
            command = command.commands[arg]
        elif not arg.startswith("-"):
            break
    return names


def _usage_line(e: click.UsageError) -> str:
    """click's usage error as the README promises it: one line, "<command>: <message> (try `vmm <command> -h`)"."""
    command = " ".join(_command_names(e.ctx))
    message = " ".join(e.format_message().split())
    return f"{command}: {message} (try `vmm {command} -h`)" if command else f"{message} (try `vmm -h`)"


def main() -> None:
    """Entry point: run the CLI, turning VmmError and click's usage errors into one line (exit 2)."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.NoArgsIsHelpError as e:  # `vmm`, `vmm bench`: click shows the help itself
        e.show()
        sys.exit(e.exit_code)
    except click.UsageError as e:  # bad option values, unknown options or commands, extra arguments
        fail(_usage_line(e), EXIT_USAGE)
    except click.ClickException as e:
        fail(" ".join(e.format_message().split()), e.exit_code)
    except click.exceptions.Abort:
        fail("aborted", 130)
    except VmmError as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except BrokenPipeError:  # `vmm boot | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
