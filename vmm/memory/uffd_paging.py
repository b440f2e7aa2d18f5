"""Demand paging with userfaultfd, as the kernel's demand_paging_test.c does it: the shared backing
of a range is registered in MISSING mode, a vCPU's first touch (through KVM's GUP of the host
address) blocks in the kernel, and a handler thread answers with UFFDIO_COPY of the unit from the
page source. ``handlers`` userfaultfds, each with one reader thread over an equal slice of the range
(one per vCPU, as the C test does by default; 1: one for all, its -a). Works on any VM type."""

from __future__ import annotations

import ctypes
import errno
import os
import select
import threading
import time
from dataclasses import dataclass

from vmm.errors import KvmError, VmmError
from vmm.kvm.uffd import MSG_SIZE, UFFD_EVENT_PAGEFAULT, Userfaultfd

from .paging import PageSource
from .regions import HUGE_PAGE_SIZE, PAGE_SIZE, GuestMemory


@dataclass
class UffdStats:
    """Faults read from the userfaultfds, UFFDIO_COPYs that copied, EEXISTs (another reader won)."""

    faults: int = 0
    copies: int = 0
    eexist: int = 0
    bytes: int = 0
    fetch_seconds: float = 0.0


class UffdPager:
    """Pages [gpa, gpa+size) (one memslot's memfd) in on first touch; close() stops the threads."""

    def __init__(
        self, memory: GuestMemory, gpa: int, size: int, source: PageSource, *, fetch: int = PAGE_SIZE, handlers: int = 1
    ) -> None:
        if fetch not in (PAGE_SIZE, HUGE_PAGE_SIZE):
            raise VmmError(f"fetch unit {fetch:#x}: expected 4K or 2M")
        r = memory.region_at(gpa)
        if gpa + size > r.end or r.shared_map is None or r.gmem is not None:
            raise VmmError(f"[{gpa:#x}, +{size:#x}): userfaultfd paging needs one memfd-only memslot")
        if handlers < 1 or size % (handlers * fetch) or gpa % fetch:
            raise VmmError(f"{size:#x} bytes do not split into {handlers} slices of whole {fetch:#x} units")
        self.gpa, self.size, self.unit, self.source = gpa, size, fetch, source
        self.hva = r.userspace_addr + gpa - r.gpa
        self.stats = UffdStats()
        self._lock = threading.Lock()
        self._stop_r, self._stop_w = os.pipe()
        self.uffds: list[Userfaultfd] = []
        self.threads: list[threading.Thread] = []
        slice_ = size // handlers
        try:
            for i in range(handlers):
                u = Userfaultfd()
                self.uffds.append(u)
                u.register(self.hva + i * slice_, slice_)
        except BaseException:
            self.close()
            raise
        for i, u in enumerate(self.uffds):
            t = threading.Thread(target=self._serve, args=(u,), name=f"vmm-uffd{i}", daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, uffd: Userfaultfd) -> None:
        """One reader: poll, read the faults, UFFDIO_COPY each faulting unit from the source."""
        buf = bytearray(MSG_SIZE * 16)
        poller = select.poll()
        poller.register(uffd.fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        unit, stats = self.unit, self.stats
        while True:
            for fd, _ in poller.poll():
                if fd == self._stop_r:
                    return
            for event, _, addr in uffd.read_msgs(buf):
                if event != UFFD_EVENT_PAGEFAULT:
                    continue
                t0 = time.perf_counter()
                hva = addr - (addr - self.hva) % unit
                n = min(unit, self.hva + self.size - hva)
                data = self.source.fetch(hva - self.hva, n)
                src = ctypes.c_char_p(data)  # a host address for UFFDIO_COPY's src (no copy)
                try:
                    uffd.copy(hva, ctypes.cast(src, ctypes.c_void_p).value or 0, n)
                    copied, exist = 1, 0
                except KvmError as e:
                    if e.errno != errno.EEXIST:  # the C test tolerates only EEXIST, so do we
                        raise
                    copied, exist = 0, 1
                with self._lock:
                    stats.faults += 1
                    stats.copies += copied
                    stats.eexist += exist
                    stats.bytes += n * copied
                    stats.fetch_seconds += time.perf_counter() - t0

    def close(self) -> None:
        """Stop the reader threads, then close the userfaultfds (the memory keeps what was copied)."""
        if self._stop_w >= 0:
            os.write(self._stop_w, b"x")
        for t in self.threads:
            t.join()
        self.threads.clear()
        for u in self.uffds:
            u.close()
        self.uffds.clear()
        for fd in (self._stop_r, self._stop_w):
            if fd >= 0:
                os.close(fd)
        self._stop_r = self._stop_w = -1

    def __enter__(self) -> UffdPager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
