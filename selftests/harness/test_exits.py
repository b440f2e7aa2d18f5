"""Every exit reason the run loop handles that this host lets a guest provoke: IO (ucall, debug
console, IN answered by a handler), MMIO, HLT, SHUTDOWN, INTERNAL_ERROR, HYPERCALL, EINTR, and
the timeout. Unhandled exits stop with the exit, the registers and the code at RIP."""

from __future__ import annotations

import threading
import time

import pytest

from vmm import Cap, ExitHandlers, ExitReason, GuestTimeout, Kvm, Machine, Ucall, UcallCmd, UnexpectedExit, load_guest
from vmm.kvm.exits import HypercallExit, InternalErrorExit, IoExit, MmioExit
from vmm.kvm.uapi import KVM_HC_MAP_GPA_RANGE, InternalError
from vmm.tools import doctor
from vmm.tools.pytest_plugin import require

# selectors of guest/exits.S
HLT, MMIO, SHUTDOWN, FETCH_MMIO, HYPERCALL, PIO_IN, SPIN, DEBUGCON = range(8)
MMIO_SIZE = 2 << 20


def exits_machine(kvm: Kvm, selector: int, handlers: ExitHandlers | None = None, **kw: object) -> Machine:
    """guest/exits.S set to provoke ``selector``; r8 (end of slot 0) is page-mapped but has no memslot."""
    m = Machine(kvm=kvm, handlers=handlers, **kw)  # type: ignore[arg-type]
    m.load(load_guest("exits"), arg=selector)
    m.page_tables.map(m.memory.region_at(0).end, MMIO_SIZE)
    m.page_tables.write()
    return m


def test_hlt(kvm: Kvm) -> None:
    """HLT (no in-kernel APIC) comes back to the caller as a KVM_EXIT_HLT exit."""
    with exits_machine(kvm, HLT) as m:
        result = m.run(timeout=5)
        assert not isinstance(result, Ucall) and result.reason == ExitReason.HLT
        assert isinstance(m.run(timeout=5), Ucall)  # resumes after the hlt: DONE


def test_mmio_handler(kvm: Kvm) -> None:
    """A store and a load at a GPA with no memslot reach on_mmio; the handler answers the load."""
    seen: list[MmioExit] = []

    class Device(ExitHandlers):
        def on_mmio(self, vcpu, exit):  # type: ignore[no-untyped-def]
            seen.append(exit)
            if not exit.is_write:
                vcpu.set_mmio_data((0xCAFE).to_bytes(8, "little"))
            return True

    with exits_machine(kvm, MMIO, Device()) as m:
        result = m.run(timeout=5)
        end = m.memory.region_at(0).end
    assert [(e.is_write, e.phys_addr, e.length) for e in seen] == [(True, end, 8), (False, end, 8)]
    assert seen[0].data == (0x1122334455667788).to_bytes(8, "little")
    assert isinstance(result, Ucall) and result.args[:2] == (1, 0xCAFE)


def test_unhandled_mmio_reports_state(kvm: Kvm) -> None:
    """Without a handler the MMIO exit stops the run with the exit, registers and code at RIP."""
    with exits_machine(kvm, MMIO) as m:
        with pytest.raises(UnexpectedExit) as failure:
            m.run(timeout=5)
        end = m.memory.region_at(0).end
    message = str(failure.value)
    assert isinstance(failure.value.exit, MmioExit)
    assert f"KVM_EXIT_MMIO write gpa={end:#x} len=8" in message
    assert "rip=" in message and "code at" in message and "cr3=" in message


def test_shutdown_on_triple_fault(kvm: Kvm) -> None:
    """ud2 under an IDT of limit 0 escalates to a triple fault: KVM_EXIT_SHUTDOWN, reported with the vCPU state.
    (Where RIP points then differs by vendor: VMX keeps the faulting state, SVM resets the vCPU.)"""
    with exits_machine(kvm, SHUTDOWN) as m:
        with pytest.raises(UnexpectedExit) as failure:
            m.run(timeout=5)
    assert failure.value.exit.reason == ExitReason.SHUTDOWN
    assert "KVM_EXIT_SHUTDOWN" in str(failure.value) and "rip=" in str(failure.value)


def test_internal_error_on_fetch_from_mmio(kvm: Kvm) -> None:
    """Executing from a GPA with no memslot cannot be emulated: KVM_EXIT_INTERNAL_ERROR (EMULATION)."""
    with exits_machine(kvm, FETCH_MMIO) as m:
        with pytest.raises(UnexpectedExit) as failure:
            m.run(timeout=5)
    exit = failure.value.exit
    assert isinstance(exit, InternalErrorExit) and exit.suberror == InternalError.EMULATION


def test_pio_in_handler(kvm: Kvm) -> None:
    """An IN from a port the run loop does not own goes to on_io, whose answer the guest reads."""
    seen: list[IoExit] = []

    class Port80(ExitHandlers):
        def on_io(self, vcpu, exit):  # type: ignore[no-untyped-def]
            seen.append(exit)
            vcpu.set_pio_data(b"\x5a")
            return True

    with exits_machine(kvm, PIO_IN, Port80()) as m:
        result = m.run(timeout=5)
    assert [(e.port, e.is_write, e.size) for e in seen] == [(0x80, False, 1)]
    assert isinstance(result, Ucall) and result.args[:2] == (1, 0x5A)


def test_debug_console(kvm: Kvm) -> None:
    """Bytes written to port 0xe9 are collected into lines of guest output."""
    printed: list[str] = []
    with exits_machine(kvm, DEBUGCON, output=lambda v, t: printed.append(t)) as m:
        result = m.run(timeout=5)
    assert printed == ["hi"]
    assert isinstance(result, Ucall) and result.cmd == UcallCmd.DONE


def test_hypercall_exit(kvm: Kvm) -> None:
    """With KVM_CAP_EXIT_HYPERCALL, KVM_HC_MAP_GPA_RANGE exits to userspace; ret lands in the guest's rax."""
    ok, reason = doctor.hypercall_exits(kvm)
    require(ok, reason)
    seen: list[HypercallExit] = []

    class Hypercalls(ExitHandlers):
        def on_hypercall(self, vcpu, exit):  # type: ignore[no-untyped-def]
            seen.append(exit)
            vcpu.set_hypercall_ret(0x77)
            return True

    with exits_machine(kvm, HYPERCALL, Hypercalls()) as m:
        m.vm.enable_cap(Cap.EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
        result = m.run(timeout=5)
    assert len(seen) == 1 and seen[0].nr == KVM_HC_MAP_GPA_RANGE and seen[0].args[1] == 1
    assert isinstance(result, Ucall) and result.args[:2] == (1, 0x77)


def test_timeout_stops_spinning_guest(kvm: Kvm) -> None:
    """A guest that never exits is stopped after the timeout with GuestTimeout; the process lives on."""
    with exits_machine(kvm, SPIN) as m:
        start = time.monotonic()
        with pytest.raises(GuestTimeout) as failure:
            m.run(timeout=0.5)
        elapsed = time.monotonic() - start
        assert 0.5 <= elapsed < 2.0
        assert "rip=" in str(failure.value)
        assert m.vcpus[0].kvm_run.immediate_exit == 0  # ready to be entered again
        with pytest.raises(GuestTimeout):
            m.run(timeout=0.2)  # and it can be run (and stopped) again


def test_eintr_is_an_exit(kvm: Kvm) -> None:
    """Signals that interrupt KVM_RUN (EINTR) are KVM_EXIT_INTR exits: the loop re-enters the guest_image."""
    with exits_machine(kvm, SPIN) as m:
        runner = m.runners[0]

        def kick_three_times() -> None:
            for _ in range(3):
                time.sleep(0.1)
                m.vcpus[0].kick()

        kicker = threading.Thread(target=kick_three_times)
        kicker.start()
        with pytest.raises(GuestTimeout):
            runner.run(timeout=1.0)
        kicker.join()
        assert runner.exit_counts[ExitReason.INTR] >= 4  # three kicks and the timeout
