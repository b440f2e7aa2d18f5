"""`vmm boot`: boot one test guest (bundled, .S or flat binary) and print its report."""

from __future__ import annotations

import math
import os
import sys
import time

import click

from vmm.errors import GuestAssertion, GuestError, GuestException, GuestTimeout, MemoryPoisoned
from vmm.guest import Machine, Ucall, UcallCmd, load_guest
from vmm.guest.layout import DATA_GPA
from vmm.kvm import Kvm
from vmm.kvm.caps import PRIVATE_MEM_REASON, auto_backing, private_memory
from vmm.kvm.syscalls import BUS_MCEERR_AO, BUS_MCEERR_AR
from vmm.kvm.uapi import Cap, ExitReason, GmemFlag, VmType, enum_name
from vmm.memory import HUGE_PAGE_SIZE, PAGE_SIZE, Backing, poison

from .paging_options import paging_options
from .units import human_size, parse_size
from .usage import EXIT_ASSERT, EXIT_PASSED, EXIT_TIMEOUT, EXIT_UNEXPECTED, fail

SYNCS_SHOWN = 16  # SYNC lines in `vmm boot`'s report (a guest may SYNC thousands of times)
# the VM's binary stats in the report: how KVM mapped the guest and what it zapped and flushed
STATS_SHOWN = ("pages_4k", "pages_2m", "pages_1g", "remote_tlb_flush", "mmu_shadow_zapped", "nx_lpage_splits")


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _exit_summary(counts: list[int]) -> str:
    return ", ".join(f"{enum_name(ExitReason, i)} {c}" for i, c in enumerate(counts) if c) or "none"


def _exit_counts(m: Machine) -> list[int]:
    return [sum(col) for col in zip(*(r.exit_counts for r in m.runners))]


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


@click.command()
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
@click.option(
    "--poison",
    "poison_gpa",
    default=None,
    metavar="GPA",
    help="Inside `vmm nested` only: poison the page backing GPA (MADV_HWPOISON) before the run, pass GPA "
    "in rcx unless --arg is given, and route the error the vCPU meets into the guest as #MC.",
)
@click.option(
    "--demand-paging",
    "paging_source",
    default=None,
    metavar="SOURCE",
    help="Demand-page a memslot at 4 GiB (rcx) from the file SOURCE: KVM_EXIT_MEMORY_FAULT page-ins (sw_protected).",
)
@click.option("--fetch", type=click.Choice(["4k", "2m"]), default=None, help="Demand-paging fetch unit [4k].")
@click.option(
    "--prefetch", type=click.IntRange(0), default=None, help="Demand paging: units fetched after each fault [0]."
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
    poison_gpa: str | None,
    paging_source: str | None,
    fetch: str | None,
    prefetch: int | None,
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
    gpa = _poison_gpa(poison_gpa) if poison_gpa is not None else None
    image = load_guest(guest_spec)
    paging = paging_options(paging_source, fetch, prefetch, vm_type)
    private = (VmType[vm_type.upper()] if vm_type else image.vm_type) == VmType.SW_PROTECTED
    if paging is not None and private:
        fail(f"--demand-paging pages the region at 4 GiB, where the private-memory guest {image.name} wants its own")
    private_size = parse_size(private_mem)
    if private_size % HUGE_PAGE_SIZE or not private_size:
        fail(f"--private-mem {private_mem} is not a positive multiple of 2M")
    with Kvm() as kvm:
        if paging is not None and not private_memory(kvm):
            fail(f"--demand-paging needs {PRIVATE_MEM_REASON} (memory-fault exits); run it in `vmm nested`")
        if private and not private_memory(kvm):
            fail(
                f"this host's KVM lacks {PRIVATE_MEM_REASON}: run private-memory guests in the "
                "nested test kernel (`vmm nested`, see README)"
            )
        vm_private = private  # the VM type; `private` alone means the guest wants a private data region
        if backing == "auto" and paging is not None:
            backing = Backing.SHARED  # slot 0 plain; the paged slot is memfd-only anyway
        elif backing == "auto":
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
        vm_kind = VmType.SW_PROTECTED if vm_private or paging else VmType.DEFAULT
        with Machine(kvm=kvm, mem_size=size, vcpus=n, backing=backing, output=show, vm_type=vm_kind) as m:
            pager = None
            if paging is not None:
                pager, user_arg = paging.attach(m, image.name, user_arg if arg != "0" else None)
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

            if gpa is not None and arg == "0":
                user_arg = gpa
            m.load(image, mode=mode, arg=user_arg, page_size=PAGE_SIZE if page_size == "4k" else HUGE_PAGE_SIZE)
            if gpa is not None:
                _poison(m, gpa)
            start = time.monotonic()
            code, verdict, routed = EXIT_PASSED, "passed (GUEST_DONE)", ""
            try:
                results = m.run_all(timeout, on_sync=on_sync)
                if any(not (isinstance(r, Ucall) and r.cmd == UcallCmd.DONE) for r in results):
                    code, verdict = EXIT_UNEXPECTED, "halted without GUEST_DONE"
            except GuestAssertion as e:
                code, verdict = EXIT_ASSERT, f"FAILED: {e}"
            except GuestTimeout as e:
                code, verdict = EXIT_TIMEOUT, f"TIMEOUT: {e}"
            except MemoryPoisoned as e:
                code, verdict = EXIT_UNEXPECTED, f"POISONED: {e}"
                routed = _route_mce(m, e, timeout)
            except GuestError as e:  # UnexpectedExit, UcallError, MemoryFaultError: the guest's failure
                code, verdict = EXIT_UNEXPECTED, f"STOPPED: {e}"
            elapsed = time.monotonic() - start
            _report(m, image.name, verdict, elapsed, syncs, sync_count[0])
            if routed:
                click.echo(routed)
            if pager is not None and paging is not None:
                click.echo(f"    paging    {paging.summary(pager, elapsed)}")
    sys.exit(code)


def _poison_gpa(text: str) -> int:
    """--poison's value: a guest physical address; refused outside a nested test kernel."""
    try:
        gpa = int(text, 0)
    except ValueError:
        fail(f"--poison {text!r} is not a guest physical address (a number, e.g. 0x200000)")
    if gpa < 0:
        fail(f"--poison {text}: a guest physical address is not negative")
    poison.refuse_unless_nested()
    return gpa


def _poison(m: Machine, gpa: int) -> None:
    """Poison the page backing ``gpa`` (its shared mapping) and say what the kernel answered."""
    if gpa >= (end := m.memory.regions[-1].end) or not any(r.gpa <= gpa < r.end for r in m.memory.regions):
        fail(f"--poison {gpa:#x} is not in guest memory (memslots end at {end:#x}; see --mem)")
    m.setup_mce()
    got = poison.poison(m.memory, gpa)
    sigbus = {BUS_MCEERR_AR: "BUS_MCEERR_AR", BUS_MCEERR_AO: "BUS_MCEERR_AO"}.get(got.sigbus or 0, "none")
    answer = f"EBUSY ({os.strerror(got.errno)})" if got.errno else "0"
    click.echo(f"vmm: poisoned the page of gpa {gpa:#x} (MADV_HWPOISON: {answer}; SIGBUS to vmm: {sigbus})")


def _route_mce(m: Machine, e: MemoryPoisoned, timeout: float) -> str:
    """Route the poison the vCPU met into the guest as #MC (KVM_X86_SET_MCE); the report line saying
    what the guest's #MC stub reported."""
    if e.gpa is None:
        return ""
    m.inject_mce(e.vcpu_id, e.gpa)
    try:
        outcome: object = m.run(e.vcpu_id, timeout)
    except GuestError as routed:
        outcome = routed
    shown = str(outcome).splitlines()[0] if isinstance(outcome, GuestException) else f"no #MC report: {outcome}"
    return f"    #MC       injected at gpa {e.gpa:#x}: {shown}"


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
    if m.kvm.check_extension(Cap.BINARY_STATS_FD) > 0:
        with m.vm.stats() as stats:
            snap = stats.read()
            click.echo("    kvm stats " + ", ".join(f"{n} {snap[n]}" for n in STATS_SHOWN if n in stats))
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
