"""The host side of guest/memory_toucher.S: a guest that touches a range in passes, with a progress
counter per vCPU the host reads while it runs (to see a vCPU stall while memslots or attributes
change), used by `vmm bench memslots` and the huge-page tests."""

from __future__ import annotations

import struct
import threading

from vmm.errors import VmmError
from vmm.kvm.exits import MmioExit
from vmm.kvm.uapi import ExitReason
from vmm.kvm.vcpu import Vcpu
from vmm.memory.regions import PAGE_SIZE

from .image import load as load_guest
from .machine import Machine

GUEST = "memory_toucher"
_STORE, _LOOP = 1, 2
_STOP, _COUNT = 32, 64


class Toucher:
    """Load memory_toucher into ``m`` and point it at [base, base+size), one touch every ``stride``
    bytes; ``store`` writes as well as reads; ``loop`` makes it pass until stop() instead of
    SYNCing after each pass (SYNC(1, sum of the u64s it loaded))."""

    def __init__(
        self, m: Machine, base: int, size: int, stride: int = PAGE_SIZE, *, store: bool = False, loop: bool = False
    ) -> None:
        if size <= 0 or stride <= 0 or size % stride:
            raise VmmError(f"toucher: size {size:#x} is not a positive multiple of stride {stride:#x}")
        if 8 * len(m.vcpus) + _COUNT > PAGE_SIZE:
            raise VmmError(f"toucher: {len(m.vcpus)} vCPUs do not fit its one-page parameter block")
        m.load(load_guest(GUEST))
        assert m.allocator is not None  # load() in long mode made it
        self.machine = m
        self.params = m.allocator.alloc(PAGE_SIZE)  # == m.free_gpa: the rdx every vCPU got
        if self.params != m.free_gpa:
            raise VmmError(f"toucher: parameter block at {self.params:#x}, the guest looks at {m.free_gpa:#x}")
        flags = (_STORE if store else 0) | (_LOOP if loop else 0)
        m.memory.write(self.params, struct.pack("<5Q", base, size, stride, flags, 0))
        self._counters = m.memory.view(self.params + _COUNT, 8 * len(m.vcpus)).cast("Q")
        self._threads: list[threading.Thread] = []
        self._pause = threading.Event()
        self._errors: list[BaseException] = []
        #: exits while looping: MMIO (a touched GPA had no memslot for a moment) and memory faults
        self.mmio_exits = 0
        self.memory_faults = 0

    def counters(self) -> list[int]:
        """Touches so far, per vCPU (read while the vCPUs run)."""
        return list(self._counters)

    def total(self) -> int:
        """Touches so far, all vCPUs."""
        return sum(self._counters)

    def stop(self) -> None:
        """Ask looping vCPUs to finish their pass and GUEST_DONE."""
        self.machine.memory.write(self.params + _STOP, struct.pack("<Q", 1))

    def start(self, n: int) -> None:
        """Run vCPUs 0..n-1 (``loop`` mode) on threads of their own until pause(). An access to a
        GPA with no memslot (the memslot way deletes the slot before re-creating it) exits as MMIO:
        counted, a read answered 0, and the vCPU re-enters; so does a memory fault (a conversion
        racing the access)."""
        self.pause()
        self._pause.clear()
        for v in self.machine.vcpus[:n]:
            t = threading.Thread(target=self._loop, args=(v,), name=f"toucher-vcpu{v.id}", daemon=True)
            t.start()
            self._threads.append(t)

    def _loop(self, vcpu: Vcpu) -> None:
        vcpu.thread_ident = threading.get_ident()
        try:
            while not self._pause.is_set():
                vcpu.kvm_run.immediate_exit = 0
                reason = vcpu.run()
                if reason == ExitReason.INTR:
                    continue
                if reason == ExitReason.MMIO:
                    self.mmio_exits += 1
                    ex = vcpu.exit()
                    if isinstance(ex, MmioExit) and not ex.is_write:
                        vcpu.set_mmio_data(bytes(8))
                    continue
                if reason == ExitReason.MEMORY_FAULT:
                    self.memory_faults += 1
                    continue
                raise VmmError(f"toucher vCPU {vcpu.id}: unexpected {vcpu.exit()}")
        except BaseException as e:  # reported by pause()
            self._errors.append(e)
        finally:
            vcpu.thread_ident = None

    def pause(self) -> None:
        """Stop the running vCPUs where they are (a kick); start() resumes them. Raises what a vCPU
        thread failed with."""
        self._pause.set()
        while any(t.is_alive() for t in self._threads):
            for v in self.machine.vcpus:
                v.kick()
            for t in self._threads:
                t.join(0.05)
        self._threads = []
        if self._errors:
            e, self._errors = self._errors[0], []
            raise e

    def release(self) -> None:
        """Drop the view of the counters (a mapping with a live view cannot be closed)."""
        self._counters.release()
