"""The `vmm` command: doctor, boot (boot.py), selftest, nested, bench (bench/). Click only: parse, call the library,
print. User mistakes end in one line on stderr and a documented exit code, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click

from vmm.errors import VmmError
from vmm.kvm import Kvm
from vmm.paths import CHECKOUT

from . import doctor, nested
from .bench.cli import bench
from .boot import boot
from .trace.cli import trace
from .usage import EXIT_USAGE, fail

# tests that never touch /dev/kvm, or test only vmm's own logic, give the same answer inside: the
# nested run leaves them to the host (the hostile-guest and run-limit stress tests take minutes
# under TCG and would tell nothing new there)
NESTED_DEFAULT_ARGS = ("-m", "not no_kvm and not host_only")


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


cli.add_command(boot)
cli.add_command(bench)
cli.add_command(trace)


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
