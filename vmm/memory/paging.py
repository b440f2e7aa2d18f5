"""Demand paging on memory attributes: "private" stands for "not present".

On a KVM_X86_SW_PROTECTED_VM a gfn whose attribute is PRIVATE in a memslot *without* a guest_memfd
cannot be mapped, so every guest access to it exits with KVM_EXIT_MEMORY_FAULT (flags PRIVATE,
gpa, size: private_mem_kvm_exits_test's second case). The pager marks a range so, and on each
such fault fetches the faulting unit (4K or 2M, plus ``prefetch`` following units) from a page
source into the shared backing (pwrite to the memfd: no pass through the mapping), flips the
range to shared (present) and lets the vCPU re-enter. Present state is vmm's attribute map (the
Converter's), so GuestMemory.read/write refuse non-present ranges like private ones.

Concurrency: a fetch claims its ranges (``inflight``) under one condition variable; a vCPU that
faults on a claimed range waits for it instead of fetching it again, and a fault whose range is
present by the time it is handled (a racing fetch: the flags are the attributes when the access
began) just re-enters. Fetches of different ranges run in parallel.

KVM's own accesses (the instruction emulator, string PIO) and host userspace read the shared
backing by host address and ignore the attributes: a non-present page reads as zeros. With
``guard`` the pager registers the range with a userfaultfd (MISSING): such an access blocks on
the punched page until the guard thread pages it in, exactly as a guest fault would."""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vmm.errors import MemoryFaultError, VmmError
from vmm.kvm.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE

from .regions import HUGE_PAGE_SIZE, PAGE_SIZE

if TYPE_CHECKING:
    from vmm.kvm.exits import MemoryFaultExit
    from vmm.kvm.uffd import Userfaultfd
    from vmm.kvm.vcpu import Vcpu

    from .convert import Converter

MAX_REPEATS = 3  # the same fault on a present page this often with nothing paged in between: a bug
FETCH_UNITS = {"4k": PAGE_SIZE, "2m": HUGE_PAGE_SIZE}


class PageSource:
    """Where pages come from: ``read(offset, length) -> bytes`` (short reads are zero-filled), with
    an optional artificial latency per fetch (a stand-in for the network of a post-copy migration)."""

    def __init__(self, read: Callable[[int, int], bytes], name: str, latency: float = 0.0) -> None:
        if latency < 0:
            raise VmmError(f"page source latency {latency!r}: expected seconds >= 0")
        self._read, self.name, self.latency = read, name, latency
        self._fd = -1

    @classmethod
    def from_fd(cls, fd: int, latency: float = 0.0, name: str | None = None) -> PageSource:
        """Pages pread from ``fd`` (a file or memfd; the caller keeps it open)."""
        return cls(lambda off, n: os.pread(fd, n, off), name or f"fd {fd}", latency)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], latency: float = 0.0) -> PageSource:
        """Pages pread from the file at ``path`` (opened here, closed by close())."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise VmmError(f"page source {path}: {e.strerror}") from None
        src = cls.from_fd(fd, latency, str(path))
        src._fd = fd
        return src

    @classmethod
    def from_bytes(cls, data: bytes, latency: float = 0.0) -> PageSource:
        """Pages sliced from ``data`` (tests, the model)."""
        view = memoryview(data)
        return cls(lambda off, n: bytes(view[off : off + n]), f"{len(data)} bytes in memory", latency)

    def fetch(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``, zero-filled past the source's end."""
        if self.latency:
            time.sleep(self.latency)
        data = self._read(offset, length)
        return data if len(data) == length else data + bytes(length - len(data))

    def close(self) -> None:
        """Close the file from_file() opened."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


SourceSpec = str | os.PathLike[str] | int | Callable[[int, int], bytes] | PageSource


def open_source(spec: SourceSpec) -> PageSource:
    """A PageSource from a path, an open fd (int), a callable or a PageSource."""
    if isinstance(spec, PageSource):
        return spec
    if isinstance(spec, int):
        return PageSource.from_fd(spec)
    if callable(spec):
        return PageSource(spec, getattr(spec, "__name__", "callable"))
    return PageSource.from_file(Path(spec))


@dataclass
class PagerStats:
    """What the pager did; ``fetch_seconds`` is time spent in the source and pwrite."""

    faults: int = 0
    stale_faults: int = 0  # present (or fetched by someone else) by the time it was handled
    waits: int = 0  # faults that waited for another thread's fetch of their range
    fetches: int = 0  # source reads (one per missing piece of a claimed window)
    bytes: int = 0
    prefetch_fetches: int = 0  # fetches made by the background thread
    guard_faults: int = 0  # KVM- or host-internal touches of non-present pages caught by the userfaultfd
    evictions: int = 0
    fetch_seconds: float = 0.0


class DemandPager:
    """Demand-pages [gpa, gpa+size) of a SW_PROTECTED VM's memory from ``source``; see the module doc."""

    def __init__(
        self,
        converter: Converter,
        gpa: int,
        size: int,
        source: PageSource,
        *,
        fetch: int = PAGE_SIZE,
        prefetch: int = 0,
        guard: bool = True,
    ) -> None:
        if fetch not in (PAGE_SIZE, HUGE_PAGE_SIZE):
            raise VmmError(f"fetch unit {fetch:#x}: expected 4K or 2M")
        if prefetch < 0:
            raise VmmError(f"prefetch {prefetch}: expected a count of units >= 0")
        if size <= 0 or gpa % fetch or size % PAGE_SIZE:
            raise VmmError(f"paged range [{gpa:#x}, +{size:#x}): must start {fetch:#x}-aligned and be whole 4K pages")
        if not converter.supported & KVM_MEMORY_ATTRIBUTE_PRIVATE:
            raise VmmError("demand paging needs KVM_MEMORY_ATTRIBUTE_PRIVATE (a KVM_X86_SW_PROTECTED_VM)")
        self.vm, self.memory, self.attributes = converter.vm, converter.memory, converter.attributes
        self.gpa, self.end, self.source = gpa, gpa + size, source
        self.unit, self.prefetch = fetch, prefetch
        self.stats = PagerStats()
        self.cond = threading.Condition(threading.Lock())
        self.inflight: list[tuple[int, int]] = []  # claimed ranges being fetched
        self.generation = 0  # bumped whenever present state changes (repeat detection)
        self._last_fault: dict[int, tuple[MemoryFaultExit, int, int]] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.uffd: Userfaultfd | None = None
        self._regions = []
        for r, off, n in converter.pieces(gpa, size, need_gmem=False):
            if r.gmem is not None or r.shared_fd < 0:
                raise VmmError(
                    f"demand paging needs memslots with a memfd and no guest_memfd: memslot {r.slot} is "
                    f"{r.backing.value}"
                )
            self._regions.append((r, off, n))
        self.evict(gpa, size)  # everything non-present: attributes PRIVATE, backing punched
        if guard:
            self._start_guard()

    # --- state ---------------------------------------------------------------------------------

    def owns(self, gpa: int) -> bool:
        """True when ``gpa`` is in the paged range."""
        return self.gpa <= gpa < self.end

    def present(self) -> list[tuple[int, int]]:
        """The present (shared) ranges of the paged range, merged."""
        with self.attributes.lock:
            return [
                (s, e) for s, e, v in self.attributes.ranges(self.gpa, self.end) if not v & KVM_MEMORY_ATTRIBUTE_PRIVATE
            ]

    def present_bytes(self) -> int:
        """Bytes of the paged range that are present."""
        return sum(e - s for s, e in self.present())

    def _missing(self, start: int, end: int) -> list[tuple[int, int]]:
        """Non-present ranges of [start, end) that nobody is fetching (caller holds cond)."""
        with self.attributes.lock:
            ranges = [(s, e) for s, e, v in self.attributes.ranges(start, end) if v & KVM_MEMORY_ATTRIBUTE_PRIVATE]
        out = []
        for s, e in ranges:
            for fs, fe in sorted(self.inflight):
                if fe <= s or fs >= e:
                    continue
                if fs > s:
                    out.append((s, fs))
                s = max(s, fe)
            if s < e:
                out.append((s, e))
        return out

    def _busy(self, start: int, end: int) -> bool:
        return any(s < end and start < e for s, e in self.inflight)

    # --- paging in and out ---------------------------------------------------------------------

    def page_in(self, gpa: int, size: int, *, wait: bool = True) -> int:
        """Make [gpa, gpa+size) present (clipped to the paged range), fetching only what is missing
        and not already being fetched; with ``wait``, return only once all of it is present. The
        bytes this call fetched (0: nothing was missing, or someone else fetched it)."""
        start, end = max(gpa, self.gpa), min(gpa + size, self.end)
        with self.cond:
            claimed = self._missing(start, end)
            self.inflight.extend(claimed)
        fetched = 0
        try:
            for s, e in claimed:
                fetched += self._fetch(s, e)
        finally:
            with self.cond:
                for c in claimed:
                    self.inflight.remove(c)
                self.generation += 1 if claimed else 0
                self.cond.notify_all()
        if wait:
            self.wait(start, end)
        return fetched

    def wait(self, start: int, end: int) -> None:
        """Block while another thread is fetching part of [start, end)."""
        with self.cond:
            while self._busy(start, end):
                self.stats.waits += 1
                self.cond.wait()

    def _fetch(self, s: int, e: int) -> int:
        """Source -> memfd for [s, e), then attributes shared: the guest never sees a half page."""
        t0 = time.perf_counter()
        data = self.source.fetch(s - self.gpa, e - s)
        view = memoryview(data)
        for r, _, _ in self._regions:
            lo, hi = max(s, r.gpa), min(e, r.end)
            if lo < hi:
                os.pwrite(r.shared_fd, view[lo - s : hi - s], lo - r.gpa)
        self.vm.set_memory_attributes(s, e - s, 0)
        self.attributes.set(s, e, 0)
        with self.cond:  # counters too: vCPU threads fetch in parallel, and += is no atomic step
            st = self.stats
            st.fetches += 1
            st.bytes += e - s
            st.fetch_seconds += time.perf_counter() - t0
        return e - s

    def evict(self, gpa: int, size: int) -> None:
        """Make [gpa, gpa+size) non-present again: attributes PRIVATE first (KVM drops its
        mappings), then PUNCH_HOLE the memfd; the next access fetches it from the source again."""
        start, end = max(gpa, self.gpa), min(gpa + size, self.end)
        if start >= end:
            return
        with self.cond:
            while self._busy(start, end):
                self.cond.wait()
            self.vm.set_memory_attributes(start, end - start, KVM_MEMORY_ATTRIBUTE_PRIVATE)
            self.attributes.set(start, end, KVM_MEMORY_ATTRIBUTE_PRIVATE)
            for r, _, _ in self._regions:
                lo, hi = max(start, r.gpa), min(end, r.end)
                if lo < hi:
                    r.punch_hole_shared(lo - r.gpa, hi - lo)
            self.generation += 1
            self.stats.evictions += 1

    # --- the exit ------------------------------------------------------------------------------

    def on_fault(self, vcpu: Vcpu, exit: MemoryFaultExit) -> bool:
        """KVM_EXIT_MEMORY_FAULT in the paged range: fetch the faulting unit (and ``prefetch``
        more) and re-enter. A fault on a range already present is stale (a racing fetch made it
        present after the access began): re-enter, bounded by MAX_REPEATS."""
        if not exit.private:
            raise MemoryFaultError(
                f"vCPU {vcpu.id}: {exit} in the demand-paged range: a shared fault is no page-in request"
            )
        with self.cond:
            self.stats.faults += 1
        lo = exit.gpa - (exit.gpa - self.gpa) % self.unit
        fetched = self.page_in(lo, self.unit * (1 + self.prefetch), wait=False)
        self.wait(lo, lo + self.unit)  # only the faulting unit: prefetched ones need not be done
        if fetched:
            self._last_fault.pop(vcpu.id, None)
            return True
        with self.cond:
            self.stats.stale_faults += 1
        last, n, then = self._last_fault.get(vcpu.id, (None, 0, -1))
        n = n + 1 if last == exit and then == self.generation else 1
        self._last_fault[vcpu.id] = (exit, n, self.generation)
        if n >= MAX_REPEATS:
            raise MemoryFaultError(
                f"vCPU {vcpu.id}: {exit} repeats {n} times on a present page with nothing paged in between"
            )
        return True

    # --- threads -------------------------------------------------------------------------------

    def start_prefetch(self, order: list[int] | None = None) -> threading.Thread:
        """Page the whole range in from a background thread, unit by unit (``order``: unit
        indices; default ascending), racing the vCPUs' faults until done or close()."""
        units = order if order is not None else list(range(-(-(self.end - self.gpa) // self.unit)))

        def work() -> None:
            for i in units:
                if self._stop.is_set():
                    return
                if self.page_in(self.gpa + i * self.unit, self.unit, wait=False):
                    self.stats.prefetch_fetches += 1

        t = threading.Thread(target=work, name="vmm-prefetch", daemon=True)
        self._threads.append(t)
        t.start()
        return t

    def _hvas(self, s: int, e: int) -> list[tuple[int, int]]:
        return [
            (r.userspace_addr + lo - r.gpa, hi - lo)
            for r, _, _ in self._regions
            if (lo := max(s, r.gpa)) < (hi := min(e, r.end))
        ]

    def _start_guard(self) -> None:
        """userfaultfd MISSING over the paged range's mappings and a thread that pages faults in."""
        from vmm.kvm.uffd import MSG_SIZE, UFFD_EVENT_PAGEFAULT, Userfaultfd

        self.uffd = uffd = Userfaultfd()
        for hva, n in self._hvas(self.gpa, self.end):
            uffd.register(hva, n)
        rd, self._wake_w = os.pipe()

        def work() -> None:
            buf = bytearray(MSG_SIZE * 16)
            poller = select.poll()
            poller.register(uffd.fd, select.POLLIN)
            poller.register(rd, select.POLLIN)
            while not self._stop.is_set():
                poller.poll()
                for event, _, addr in uffd.read_msgs(buf):
                    if event == UFFD_EVENT_PAGEFAULT:
                        self.stats.guard_faults += 1
                        self._guard_fault(addr)
            os.close(rd)

        t = threading.Thread(target=work, name="vmm-pager-guard", daemon=True)
        self._threads.append(t)
        t.start()

    def _guard_fault(self, hva: int) -> None:
        for r, _, _ in self._regions:
            if r.userspace_addr <= hva < r.userspace_addr + r.size:
                gpa = r.gpa + (hva - r.userspace_addr) // PAGE_SIZE * PAGE_SIZE
                lo = gpa - (gpa - self.gpa) % self.unit
                self.page_in(lo, self.unit)  # waits for a fetch another thread has in flight
                # the toucher sleeps until woken (only here: the guest's own page-ins pay nothing)
                for a, n in self._hvas(lo, min(lo + self.unit, self.end)):
                    self.uffd.wake(a, n)  # type: ignore[union-attr]
                return

    def close(self) -> None:
        """Stop the threads and drop the userfaultfd (the memory stays as it is)."""
        self._stop.set()
        if self.uffd is not None:
            os.write(self._wake_w, b"x")
        for t in self._threads:
            t.join()
        self._threads.clear()
        if self.uffd is not None:
            os.close(self._wake_w)
            self.uffd.close()
            self.uffd = None

    def report(self) -> str:
        """One line: faults, fetches, bytes, time, present bytes."""
        s = self.stats
        return (
            f"demand paging from {self.source.name}: {s.faults} faults ({s.stale_faults} stale, {s.waits} waits), "
            f"{s.fetches} fetches ({s.prefetch_fetches} background), {s.bytes} bytes in {s.fetch_seconds:.3f} s, "
            f"{s.guard_faults} guard faults, {self.present_bytes()} of {self.end - self.gpa} bytes present"
        )
