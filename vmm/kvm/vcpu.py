"""A vCPU fd: KVM_RUN over a reused ctypes view of kvm_run, registers, CPUID, pre-faulting."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from . import syscalls, uapi
from .exits import Exit, decode
from .fd import KvmFd
from .stats import Stats
from .uapi import ExitReason

if TYPE_CHECKING:
    from .vm import Vm

_EHWPOISON = getattr(errno, "EHWPOISON", 133)
# The signal kick() sends: a real-time signal, as Firecracker kicks its vCPUs with
# sigrtmin() + VCPU_RTSIG_OFFSET (0) in vstate/vcpu.rs. It collides with no SIGUSR1/SIGUSR2 user,
# and real-time signals queue: two kicks are two deliveries, not one merged pending bit.
KICK_SIGNAL = signal.SIGRTMIN


def _install_kick_handler() -> bool:
    """Make KICK_SIGNAL interrupt KVM_RUN with EINTR instead of killing the process (its default
    action) by installing a no-op handler; True when a handler is in place. Python installs
    handlers from the main thread only, so this also runs when this module is imported (normally
    on the main thread, by ``import vmm``); from another thread it only reports."""
    if callable(signal.getsignal(KICK_SIGNAL)):
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)  # interrupting KVM_RUN is all a kick is for
    return True


_install_kick_handler()

# SIGBUS on a vCPU thread. When a vCPU touches guest memory whose host page is poisoned (memory
# failure), KVM sends the thread SIGBUS with BUS_MCEERR_AR and the host address
# (kvm_send_hwpoison_signal()) and KVM_RUN returns EINTR; the default action would kill the
# process. vmm's handler records the signal for the thread inside KVM_RUN (Vcpu.sigbus) and
# returns. A SIGBUS anywhere else (a fault of the thread's own access, a kill): the handler puts
# the action that was there before back and sends the signal again, so it takes that action (as if
# vmm had installed none).
_tls = threading.local()
_sigbus_previous: bytes | None = None


def _on_sigbus(signo: int, info: ctypes._Pointer[syscalls.siginfo_t], context: int) -> None:
    global _sigbus_previous
    caught = getattr(_tls, "caught", None)
    if getattr(_tls, "in_run", False) or caught is not None:
        i = info.contents
        got = (int(i.si_code), int(i.si_addr), int(i.si_addr_lsb))
        if caught is not None:
            caught.append(got)
        else:
            _tls.sigbus = got
        return
    if _sigbus_previous is not None:
        syscalls.restore_sigaction(signal.SIGBUS, _sigbus_previous)
        _sigbus_previous = None
    # sent again, pending until this handler returns: a signal that was no fault (kill -BUS, an
    # asynchronous BUS_MCEERR_AO) takes that action too instead of being swallowed
    signal.pthread_kill(threading.get_ident(), signal.SIGBUS)


_SIGBUS_HANDLER = syscalls.SIGINFO_HANDLER(_on_sigbus)
_SIGBUS_ADDRESS = ctypes.cast(_SIGBUS_HANDLER, ctypes.c_void_p).value


@contextmanager
def sigbus_caught() -> Iterator[list[tuple[int, int, int]]]:
    """For the length of a ``with`` block, a SIGBUS this thread is sent (not one from its own
    access, which would come again) is appended to the yielded list as (si_code, si_addr,
    si_addr_lsb) instead of killing the process: MADV_HWPOISON sends one to its caller."""
    _install_sigbus_handler()
    got: list[tuple[int, int, int]] = []
    _tls.caught = got
    try:
        yield got
    finally:
        _tls.caught = None


def _install_sigbus_handler() -> None:
    """Catch SIGBUS on vCPU threads (see above), unless vmm's handler is the one installed now: also
    after a foreign fault put the old action back, or someone installed another since (pytest's
    faulthandler does, between tests), whose action then becomes the one handed back to."""
    global _sigbus_previous
    if syscalls.sigaction_handler(signal.SIGBUS) != _SIGBUS_ADDRESS:
        _sigbus_previous = syscalls.sigaction(signal.SIGBUS, _SIGBUS_HANDLER)


class Vcpu(KvmFd):
    """One vCPU; ``run()`` enters the guest until the next exit."""

    kind = "vCPU"

    def __init__(self, vm: Vm, fd: int, vcpu_id: int, mmap_size: int) -> None:
        super().__init__(fd)
        self.vm = vm
        self.id = vcpu_id
        try:
            self._map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            self.close()
            raise self.error("mmap", e.errno or 0, "kvm_run") from None
        self.kvm_run = uapi.kvm_run.from_buffer(self._map)
        self.run_bytes = memoryview(self._map)  # the same page as bytes, for PIO data
        # the page as u32s for the per-exit reads (exit_reason is run_u32[2], offset 8 as
        # test_uapi_layout checks): 40 ns where a ctypes field takes 270 (timeit on this host)
        self.run_u32 = self.run_bytes[: mmap_size & ~3].cast("I")
        self.thread_ident: int | None = None  # native thread inside run(), for kick()
        self.fault_errno = 0  # KVM_RUN's errno with the last memory-fault exit (EFAULT or EHWPOISON)
        self.sigbus: tuple[int, int, int] | None = None  # (si_code, si_addr, si_addr_lsb) of a SIGBUS in KVM_RUN
        _install_kick_handler()
        _install_sigbus_handler()

    def run(self) -> int:
        """KVM_RUN once. Returns kvm_run.exit_reason; a memory fault (-EFAULT/-EHWPOISON with
        exit_reason MEMORY_FAULT) and a signal (-EINTR, reported as KVM_EXIT_INTR) are exits, not errors.
        api.rst: "KVM_EXIT_MEMORY_FAULT is unique among all KVM exit reasons in that it accompanies a
        return code of '-1', not '0'!" (rust-vmm's VcpuFd::run() special-cases it the same way)."""
        tls = _tls
        tls.in_run = True
        try:
            fcntl.ioctl(self.fd, uapi.KVM_RUN, 0)
        except InterruptedError:
            tls.in_run = False
            self._take_sigbus()
            return ExitReason.INTR
        except OSError as e:
            tls.in_run = False
            if e.errno in (errno.EFAULT, _EHWPOISON) and self.kvm_run.exit_reason == ExitReason.MEMORY_FAULT:
                self.fault_errno = e.errno or 0
                return ExitReason.MEMORY_FAULT
            raise self.error(uapi.KVM_RUN, e.errno or 0) from None
        except ValueError:  # fcntl refuses fd -1: name the call instead
            tls.in_run = False
            if self.fd < 0:
                raise ValueError("KVM_RUN on closed vCPU fd") from None
            raise
        tls.in_run = False
        return self.run_u32[2]

    @staticmethod
    def catch_sigbus() -> None:
        """Make sure vmm's SIGBUS handler is the one installed (a run begins with this: something may
        have installed another since the vCPU was created)."""
        _install_sigbus_handler()

    def _take_sigbus(self) -> None:
        """Move a SIGBUS this thread took inside KVM_RUN to ``self.sigbus`` (for the run loop)."""
        got = getattr(_tls, "sigbus", None)
        if got is not None:
            _tls.sigbus = None
            self.sigbus = got

    def run_raw(self) -> tuple[int, int]:
        """KVM_RUN once with the kernel's answer untouched (the selftests' __vcpu_run()): (errno or
        0, kvm_run.exit_reason), for tests that check the errno itself."""
        if self.fd < 0:
            raise ValueError("KVM_RUN on closed vCPU fd")
        _tls.in_run = True
        try:
            fcntl.ioctl(self.fd, uapi.KVM_RUN, 0)
        except OSError as e:
            _tls.in_run = False
            self._take_sigbus()
            return e.errno or -1, self.kvm_run.exit_reason
        _tls.in_run = False
        return 0, self.kvm_run.exit_reason

    def exit(self, reason: int | None = None) -> Exit:
        """The last exit as a typed value (decoded from kvm_run now)."""
        return decode(self.kvm_run, self.kvm_run.exit_reason if reason is None else reason, self.run_bytes)

    def set_pio_data(self, data: bytes) -> None:
        """Answer a port IN exit: the bytes the guest's IN instruction receives."""
        off = self.kvm_run.io.data_offset
        self.run_bytes[off : off + len(data)] = data

    def set_mmio_data(self, data: bytes) -> None:
        """Answer an MMIO read exit: the bytes the guest's load receives (at most 8)."""
        ctypes.memmove(ctypes.addressof(self.kvm_run.mmio.data), data, min(len(data), 8))

    def set_hypercall_ret(self, ret: int) -> None:
        """Answer a KVM_EXIT_HYPERCALL: the value the guest finds in rax (negative: an -errno)."""
        self.kvm_run.hypercall.ret = ret & 0xFFFFFFFFFFFFFFFF

    def kick(self) -> None:
        """Make KVM_RUN return soon with KVM_EXIT_INTR, from any thread: immediate_exit for the next
        entry, and KICK_SIGNAL to ``thread_ident`` (the thread inside KVM_RUN, if any) for a run in
        progress. The signal is only sent while its no-op handler is installed, so a kick can never
        kill the process. The caller keeps ``thread_ident``'s thread from ending meanwhile (Runner
        kicks under a lock its threads clear ``thread_ident`` under before they leave a run). A
        closed vCPU is not kicked."""
        run = self.kvm_run
        if run is None:
            return
        run.immediate_exit = 1
        ident = self.thread_ident
        if ident is not None and _install_kick_handler():
            try:
                signal.pthread_kill(ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def get_regs(self) -> uapi.kvm_regs:
        """KVM_GET_REGS."""
        regs = uapi.kvm_regs()
        self.ioctl(uapi.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: uapi.kvm_regs) -> None:
        """KVM_SET_REGS."""
        self.ioctl(uapi.KVM_SET_REGS, regs)

    def get_sregs(self) -> uapi.kvm_sregs:
        """KVM_GET_SREGS."""
        sregs = uapi.kvm_sregs()
        self.ioctl(uapi.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        """KVM_SET_SREGS."""
        self.ioctl(uapi.KVM_SET_SREGS, sregs)

    def set_cpuid2(self, cpuid: bytearray) -> None:
        """KVM_SET_CPUID2 with a kvm_cpuid2 buffer (e.g. Kvm.supported_cpuid)."""
        self.ioctl(uapi.KVM_SET_CPUID2, bytearray(cpuid))

    def setup_mce(self, mcg_cap: int) -> None:
        """KVM_X86_SETUP_MCE: give the vCPU MCG_CAP ``mcg_cap`` (bank count in bits 7:0, at most
        KVM_CAP_MCE's; capability bits from Kvm.mce_cap_supported()); KVM sets MCG_CTL and every
        MCi_CTL to all ones, so uncorrected errors are reported."""
        self.ioctl(uapi.KVM_X86_SETUP_MCE, bytearray(mcg_cap.to_bytes(8, "little")))

    def set_mce(self, mce: uapi.kvm_x86_mce) -> None:
        """KVM_X86_SET_MCE: record ``mce`` in its bank; an uncorrected one (MCi_STATUS.UC) queues #MC
        for the next entry, or a triple fault when CR4.MCE is clear or MCG_STATUS.MCIP is set
        (kvm_vcpu_ioctl_x86_set_mce)."""
        self.ioctl(uapi.KVM_X86_SET_MCE, mce)

    def pre_fault_memory(self, gpa: int, size: int) -> None:
        """KVM_PRE_FAULT_MEMORY: map [gpa, gpa+size) ahead of use, resuming where KVM stopped early."""
        req = uapi.kvm_pre_fault_memory(gpa=gpa, size=size)
        while req.size:  # success after mapping part of the range is 0 too: go on until size is 0
            self.retrying(uapi.KVM_PRE_FAULT_MEMORY, req, (errno.EINTR, errno.EAGAIN))

    def stats(self) -> Stats:
        """KVM_GET_STATS_FD: this vCPU's binary stats (exits, halt polls, pf_taken...); a new fd
        each call, closed with the returned object."""
        return Stats(self.ioctl(uapi.KVM_GET_STATS_FD), f"vCPU {self.id}")

    def dead_vm_note(self) -> str:
        """An EIO on a vCPU fd is explained by its VM (KVM checks the VM's state for both)."""
        return self.vm.dead_vm_note()

    def close(self) -> None:
        """Close the fd now; the kvm_run mapping goes with it unless a caller still holds a view of
        it (e.g. a traceback's frame), in which case it is unmapped when the last view dies."""
        if getattr(self, "kvm_run", None) is not None:
            self.kvm_run = None  # type: ignore[assignment]
            self.run_u32.release()
            self.run_bytes.release()
            try:
                self._map.close()
            except BufferError:
                pass
            self._map = None  # type: ignore[assignment]
        super().close()
