"""The `vmm` command: doctor, boot, selftest, nested, bench. User mistakes end in one line on
stderr and a non-zero exit code, never a traceback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

import click

from .errors import VmmError

# exit codes of `vmm boot` (the guest's verdict)
EXIT_PASSED, EXIT_ASSERT, EXIT_USAGE, EXIT_UNEXPECTED, EXIT_TIMEOUT = 0, 1, 2, 3, 4

_SIZE = re.compile(r"^(0x[0-9a-f]+|\d+)\s*([kmgt]?)(i?b)?$", re.I)


def parse_size(text: str) -> int:
    """'4M', '2MiB', '65536', '0x10000' -> bytes; page alignment is checked by the caller."""
    m = _SIZE.match(text.strip())
    if not m:
        raise VmmError(f"bad size {text!r}: use a number with an optional K/M/G/T suffix")
    value = int(m.group(1), 0)
    return value << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()]


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    click.echo(f"vmm: {message}", err=True)
    sys.exit(code)


def _human(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """vmm: a Python VMM harness over /dev/kvm for testing guest_memfd private memory."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor(as_json: bool) -> None:
    """Report KVM capabilities (on /dev/kvm and per VM type) and which selftests will run."""
    from .doctor import render, report
    from .system import Kvm

    with Kvm() as kvm:
        r = report(kvm)
    click.echo(json.dumps(r, indent=2) if as_json else render(r))


@cli.command()
@click.argument("guest_spec", metavar="GUEST", default="hello")
@click.option("--mem", "mem", default="4M", show_default=True, help="Guest memory (slot 0), e.g. 4M, 64M.")
@click.option("--vcpus", type=click.IntRange(1, 256), default=None, help="vCPUs (default: the guest's header).")
@click.option("--backing", type=click.Choice(["shared", "guest_memfd", "guest_memfd-only", "auto"]), default="auto",
              show_default=True, help="auto: guest_memfd-only when the host can mmap guest_memfd, else guest_memfd.")
@click.option("--mode", type=click.Choice(["real", "long"]), default=None, help="CPU mode (default: the guest's header).")
@click.option("--page-size", type=click.Choice(["4k", "2m"]), default="2m", show_default=True, help="Guest page tables.")
@click.option("--arg", default="0", show_default=True, help="Value passed to the guest in rcx.")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds before the guest is stopped.")
@click.option("--vm-type", type=click.Choice(["default", "sw_protected"]), default=None,
              help="KVM VM type (default: the guest's header); sw_protected adds private-capable memory.")
@click.option("--private-mem", default="8M", show_default=True,
              help="With --vm-type sw_protected: memfd + guest_memfd region at 4 GiB, passed in rcx.")
def boot(guest_spec: str, mem: str, vcpus: int | None, backing: str, mode: str | None, page_size: str,
         arg: str, timeout: float, vm_type: str | None, private_mem: str) -> None:
    """Boot GUEST (a bundled name, a .S source or a flat binary) and print its report."""
    from . import guest
    from .machine import Machine
    from .memory import PAGE_SIZE
    from .runner import GuestAssertion, GuestTimeout, UnexpectedExit
    from .system import Kvm
    from .ucall import Ucall, UcallCmd
    from .doctor import PRIVATE_MEM_REASON, private_memory
    from .uapi import Cap, GmemFlag, VmType

    size = parse_size(mem)
    if size % PAGE_SIZE:
        fail(f"--mem {mem} is not a multiple of the page size ({PAGE_SIZE})")
    if size > _host_memory():
        fail(f"--mem {mem} is larger than this host's memory ({_human(_host_memory())})")
    try:
        user_arg = int(arg, 0)
    except ValueError:
        fail(f"--arg {arg!r} is not a number")
    image = guest.load(guest_spec)
    private = (vm_type or image.vm_type) == "sw_protected"
    private_size = parse_size(private_mem)
    if private_size % (2 << 20) or not private_size:
        fail(f"--private-mem {private_mem} is not a positive multiple of 2M")
    with Kvm() as kvm:
        if private and not private_memory(kvm):
            fail(f"this host's KVM lacks {PRIVATE_MEM_REASON}: run private-memory guests in the "
                 "nested test kernel (`vmm nested`, see README)")
        vm_private = private  # the VM type; `private` alone means the guest wants a private data region
        if backing == "auto":
            backing, vm_private = _auto_backing(kvm, private)
        elif backing != "shared":
            vm_type_name = "sw_protected" if private else "default"
            with kvm.create_vm(VmType.SW_PROTECTED if private else VmType.DEFAULT) as probe:
                if not probe.check_extension(Cap.GUEST_MEMFD):
                    fail(f"--backing {backing} needs KVM_CAP_GUEST_MEMFD on a {vm_type_name} VM"
                         + ("" if private else "; try --vm-type sw_protected"))
                flags = probe.check_extension(Cap.GUEST_MEMFD_FLAGS)
            if backing == "guest_memfd-only" and flags & (GmemFlag.MMAP | GmemFlag.INIT_SHARED) != GmemFlag.MMAP | GmemFlag.INIT_SHARED:
                fail("--backing guest_memfd-only needs GUEST_MEMFD_FLAG_MMAP|INIT_SHARED in KVM_CAP_GUEST_MEMFD_FLAGS")
        n = vcpus or image.vcpus

        def show(vcpu_id: int, text: str) -> None:
            click.echo(f"guest[{vcpu_id}]: {text}" if n > 1 else f"guest: {text}")

        syncs: list[Ucall] = []
        click.echo(f"vmm: booting {image.name} ({len(image.binary)} bytes, {mode or image.mode.value} mode, "
                   f"{n} vCPU{'s' if n > 1 else ''}, {_human(size)} {backing}"
                   f"{', KVM_X86_SW_PROTECTED_VM' if vm_private else ''})")
        vm_kind = VmType.SW_PROTECTED if vm_private else VmType.DEFAULT
        with Machine(kvm=kvm, mem_size=size, vcpus=n, backing=backing, output=show, vm_type=vm_kind) as m:
            if private:
                m.add_private_memory(PRIVATE_BASE, private_size)
                if arg == "0":
                    user_arg = PRIVATE_BASE
                syncs_hook = lambda uc: (syncs.append(uc), _accounting(m, uc))  # noqa: E731
            else:
                syncs_hook = syncs.append
            m.load(image, mode=mode, arg=user_arg, page_size=(4 << 10) if page_size == "4k" else (2 << 20))
            start = time.monotonic()
            code, verdict = EXIT_PASSED, "passed (GUEST_DONE)"
            try:
                results = m.run_all(timeout, on_sync=syncs_hook)
                if any(not (isinstance(r, Ucall) and r.cmd == UcallCmd.DONE) for r in results):
                    code, verdict = EXIT_UNEXPECTED, "halted without GUEST_DONE"
            except GuestAssertion as e:
                code, verdict = EXIT_ASSERT, f"FAILED: {e}"
            except GuestTimeout as e:
                code, verdict = EXIT_TIMEOUT, f"TIMEOUT: {e}"
            except UnexpectedExit as e:
                code, verdict = EXIT_UNEXPECTED, f"STOPPED: {e}"
            elapsed = time.monotonic() - start
            click.echo(f"--- {image.name}: {verdict}")
            counts = [sum(col) for col in zip(*(r.exit_counts for r in m.runners))]
            exits = ", ".join(f"{_reason(i)} {c}" for i, c in enumerate(counts) if c)
            click.echo(f"    time      {elapsed * 1000:.1f} ms, exits: {exits or 'none'}")
            for s in syncs:
                click.echo(f"    sync      vCPU {s.vcpu_id} stage {s.stage} values {[hex(a) for a in s.args[1:] if a]}")
            region = m.memory.region_at(0)
            click.echo(f"    memory    slot 0: shared backing {_human(region.shared_allocated())} allocated, "
                       f"guest_memfd {_human(region.private_allocated())} resident")
            if m.converter is not None:
                st = m.converter.stats
                click.echo(f"    private   {st.conversions} conversions ({_human(st.bytes_to_private)} to private, "
                           f"{_human(st.bytes_to_shared)} to shared); now shared {_human(m.converter.shared_allocated())}, "
                           f"private {_human(m.converter.private_allocated())}")
    sys.exit(code)


PRIVATE_BASE = 1 << 32


def _auto_backing(kvm: "object", private: bool) -> tuple[str, bool]:
    """The most guest_memfd-backed slot 0 this host offers: a mmap'd guest_memfd alone (6.18), else
    memfd + guest_memfd on a default VM, else on a KVM_X86_SW_PROTECTED_VM (6.12), else shared."""
    from .doctor import private_memory
    from .uapi import Cap, GmemFlag, VmType

    both = GmemFlag.MMAP | GmemFlag.INIT_SHARED
    with kvm.create_vm(VmType.SW_PROTECTED if private else VmType.DEFAULT) as probe:  # type: ignore[attr-defined]
        if not private and probe.check_extension(Cap.GUEST_MEMFD_FLAGS) & both == both:
            return "guest_memfd-only", private
        if probe.check_extension(Cap.GUEST_MEMFD):
            return "guest_memfd", private
    if private_memory(kvm):  # type: ignore[arg-type]
        return "guest_memfd", True
    return "shared", private


def _accounting(m: "object", uc: "object") -> None:
    """Per-step line for private guests: bytes held by each backing, conversions, exits so far."""
    conv = m.converter  # type: ignore[attr-defined]
    counts = [sum(col) for col in zip(*(r.exit_counts for r in m.runners))]  # type: ignore[attr-defined]
    exits = ", ".join(f"{_reason(i)} {c}" for i, c in enumerate(counts) if c)
    click.echo(f"    step {uc.stage}: shared {_human(conv.shared_allocated())}, private "  # type: ignore[attr-defined]
               f"{_human(conv.private_allocated())}, conversions {conv.stats.conversions}, exits: {exits}")


def _reason(i: int) -> str:
    from .uapi import ExitReason

    try:
        return ExitReason(i).name
    except ValueError:
        return str(i)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("pytest_args", nargs=-1, type=click.UNPROCESSED)
def selftest(pytest_args: tuple[str, ...]) -> None:
    """Run the selftests on this host (arguments go to pytest)."""
    root = Path(__file__).resolve().parent.parent
    tests = root / "selftests"
    if not tests.is_dir():
        fail(f"selftests not found at {tests} (run from a checkout)")
    cmd = [sys.executable, "-m", "pytest", str(tests), *pytest_args]
    sys.exit(subprocess.call(cmd, cwd=root))


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--kernel", default=None, help="bzImage to boot (default: $VMM_TEST_KERNEL, cached build, ../shared/kernels).")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto", show_default=True)
@click.option("--timeout", type=float, default=1800.0, show_default=True, help="Seconds for the whole nested run.")
@click.option("--command", "command", default=None, metavar="SHELL_COMMAND",
              help="Run this shell command inside (in the checkout, venv first on PATH) instead of pytest.")
@click.option("--results", default=None, metavar="DIR", help="Results folder, emptied first [default: results/nested].")
@click.argument("pytest_args", nargs=-1, type=click.UNPROCESSED)
def nested(kernel: str | None, accel: str, timeout: float, command: str | None, results: str | None,
           pytest_args: tuple[str, ...]) -> None:
    """Boot a test kernel with KVM_X86_SW_PROTECTED_VM under QEMU and run the selftests (or a command) inside."""
    from .nested import main_nested

    if command is not None and pytest_args:
        fail("--command replaces pytest: give pytest arguments or --command, not both")
    if command is None and not pytest_args:
        pytest_args = NESTED_DEFAULT_ARGS
    sys.exit(main_nested(kernel, accel, timeout, list(pytest_args), command=command, results=results))


# tests that never touch /dev/kvm give the same answer inside: the nested run leaves them to the host
NESTED_DEFAULT_ARGS = ("-m", "not no_kvm")


@cli.group()
def bench() -> None:
    """Benchmarks: print figures and write JSON; compare against a reference measured in the same run."""


@bench.command("exits")
@click.option("--exits", "n", type=click.IntRange(1), default=200_000, show_default=True)
@click.option("--repeats", type=click.IntRange(1), default=5, show_default=True)
@click.option("--json", "json_path", default=None, help="Write the figures to this file.")
def bench_exits(n: int, repeats: int, json_path: str | None) -> None:
    """PIO ucall round trip: vmm's run loop against a minimal C KVM_RUN loop."""
    from .bench import main as bench_main

    args = ["--exits", str(n), "--repeats", str(repeats)] + (["--json", json_path] if json_path else [])
    sys.exit(bench_main(args))


@bench.command("conversions")
@click.option("--size", default="1G", show_default=True, help="Guest-driven sweep size (multiple of 2M).")
@click.option("--size-4k", default=None,
              help="Smaller size for the 4K sweep only; its exits are scaled to --size (labelled).")
@click.option("--peak-size", default="256M", show_default=True, help="Populated region of the peak-allocation sweeps.")
@click.option("--repeats", type=click.IntRange(1), default=5, show_default=True,
              help="Runs of the C test and of our port.")
@click.option("--sweep-repeats", type=click.IntRange(1), default=1, show_default=True, help="Runs of each sweep.")
@click.option("--c-test", default=None, metavar="PATH",
              help="C private_mem_conversions_test [default: ~/.cache/vmm/kselftests/private_mem_conversions_test].")
@click.option("--skip", multiple=True, type=click.Choice(["sweeps", "peak", "compare"]), help="Leave a part out.")
@click.option("--json", "json_path", default=None, help="Write the figures to this file.")
@click.option("--check", is_flag=True, help="Exit 1 when a target is missed.")
def bench_conversions(size: str, size_4k: str | None, peak_size: str, repeats: int, sweep_repeats: int,
                      c_test: str | None, skip: tuple[str, ...], json_path: str | None, check: bool) -> None:
    """Conversions/s and exits per MiB at 4K and 2M, peak allocation, C test vs our port (needs private memory)."""
    from .bench_conversions import main as bench_main

    args = ["--size", size, "--peak-size", peak_size, "--repeats", str(repeats), "--sweep-repeats", str(sweep_repeats)]
    args += (["--size-4k", size_4k] if size_4k else []) + (["--c-test", c_test] if c_test else [])
    args += [a for part in skip for a in ("--skip", part)] + (["--json", json_path] if json_path else [])
    sys.exit(bench_main(args + (["--check"] if check else [])))


def main() -> None:
    """Entry point: run the CLI, turning VmmError into a one-line message."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        fail("aborted", 130)
    except VmmError as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except BrokenPipeError:  # `vmm boot | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
