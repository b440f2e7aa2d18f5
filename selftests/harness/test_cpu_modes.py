"""Guests start in 16-bit real mode and in 64-bit long mode (4K and 2M identity page tables), on
one vCPU or several, each on its own thread (as lib/x86_64/processor.c sets vCPUs up)."""

from __future__ import annotations

import threading

import pytest

from vmm import Kvm, Machine, Ucall, load_guest
from vmm.guest.layout import IMAGE_GPA, SYSTEM_GPA
from vmm.tools.pytest_plugin import boot

from helpers import expect_done, expect_sync


def test_real_mode(kvm: Kvm) -> None:
    """A real-mode guest runs with CR0.PE clear, segment arithmetic works, and it gets its vCPU id."""
    with boot("real_mode", kvm) as m:
        assert expect_sync(m.run(timeout=5)).args[:2] == (1, 0)
        expect_done(m.run(timeout=5))
        sregs = m.vcpus[0].get_sregs()
        assert sregs.cr0 & 1 == 0


@pytest.mark.parametrize("page_size, leaf_level", [(4 << 10, 1), (2 << 20, 2)], ids=["4K", "2M"])
def test_long_mode(kvm: Kvm, page_size: int, leaf_level: int) -> None:
    """A long-mode guest sees EFER.LMA, CR0.PG, CR4.PAE, and page tables with the leaf size we built."""
    with Machine(kvm=kvm) as m:
        m.load(load_guest("long_mode"), page_size=page_size)
        assert expect_sync(m.run(timeout=5)).args[:2] == (1, leaf_level)
        assert expect_sync(m.run(timeout=5)).args[:2] == (2, 0)
        expect_done(m.run(timeout=5))
        sregs = m.vcpus[0].get_sregs()
        assert sregs.efer & (1 << 10) and sregs.cs.l == 1
        assert SYSTEM_GPA <= sregs.cr3 < m.memory.region_at(0).end


def test_image_loaded_at_base(kvm: Kvm) -> None:
    """The image lies at IMAGE_GPA and execution starts at its first byte."""

    image = load_guest("hello")
    with boot("hello", kvm) as m:
        assert m.memory.read(IMAGE_GPA, len(image.binary)) == image.binary
        assert m.vcpus[0].get_regs().rip == IMAGE_GPA


def test_vcpus_on_threads(kvm: Kvm) -> None:
    """Four vCPUs run concurrently on their own threads; each counts in its own cache line."""
    with boot("smp", kvm, vcpus=4) as m:
        seen: list[int] = []
        threads_seen: set[str] = set()  # names, not idents: an ident is reused once a thread ends
        lock = threading.Lock()

        def on_sync(uc: Ucall) -> None:
            with lock:
                seen.append(uc.args[1])
                threads_seen.add(threading.current_thread().name)

        results = m.run_all(timeout=30, on_sync=on_sync)
        for r in results:
            expect_done(r)
        assert sorted(seen) == [0, 1, 2, 3]
        assert len(threads_seen) == 4
