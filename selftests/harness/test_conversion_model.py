"""Property-based: random conversions (guest hypercalls and host calls), PUNCH_HOLEs, guest writes
and checks, and host writes, issued to several vCPUs; every byte the guest and the host see is
checked against a page model after each step.

The model: converting a page to the other side shows zeros (the side that becomes visible was
discarded or never allocated); converting to the side it is already on changes nothing; a punch
zeroes private pages; host writes reach shared pages only."""

from __future__ import annotations

import queue
import threading

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vmm import Kvm, Machine, PrivateMemoryHandlers, Ucall, VmType, load_guest
from vmm.tools.pytest_plugin import require_private_mem

pytestmark = pytest.mark.private_mem

PAGE = 4096
PAGES = 48
BASE = 1 << 32
VCPUS = 2
DONE, WRITE, CHECK, MAP = 0, 1, 2, 3

pages = st.integers(0, PAGES - 1)
lengths = st.integers(1, 12)
vcpus = st.integers(0, VCPUS - 1)
patterns = st.integers(1, 255)


class Agent:
    """The memory_agent guest on its own thread per vCPU; ``call`` runs one command on one vCPU."""

    def __init__(self, kvm: Kvm) -> None:
        self.m = Machine(kvm=kvm, vm_type=VmType.SW_PROTECTED, vcpus=VCPUS)
        self.m.add_private_memory(BASE, PAGES * PAGE)
        self.m.load(load_guest("memory_agent"))
        self.commands = [queue.Queue[tuple[int, int, int, int]]() for _ in range(VCPUS)]
        self.results = [queue.Queue[tuple[int, int]]() for _ in range(VCPUS)]
        self.failure: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="agent")
        self.thread.start()
        for r in self.results:  # each vCPU's first SYNC: ready
            r.get(timeout=60)

    def _run(self) -> None:
        try:
            self.m.run_all(timeout=60, on_sync=self._on_sync)
        except BaseException as e:  # reported by call()
            self.failure.append(e)
            for r in self.results:
                r.put((-1, -1))

    def _on_sync(self, uc: Ucall) -> None:
        self.results[uc.vcpu_id].put((uc.args[1], uc.args[2]))
        op, gpa, size, value = self.commands[uc.vcpu_id].get()
        mailbox = self.m.free_gpa + 64 * uc.vcpu_id
        self.m.memory.write(mailbox, b"".join(v.to_bytes(8, "little") for v in (op, gpa, size, value)))

    def call(self, vcpu: int, op: int, first: int, n: int, value: int) -> tuple[int, int]:
        self.commands[vcpu].put((op, BASE + first * PAGE, n * PAGE, value))
        result = self.results[vcpu].get(timeout=120)
        if self.failure:
            raise self.failure[0]
        return result

    def close(self) -> None:
        for c in self.commands:
            c.put((DONE, 0, 0, 0))
        self.thread.join(timeout=60)
        self.m.close()
        if self.failure:
            raise self.failure[0]


class PrivateMemoryModel(RuleBasedStateMachine):
    kvm: Kvm

    def __init__(self) -> None:
        super().__init__()
        self.agent = Agent(self.kvm)
        self.private = [False] * PAGES
        self.content = [0] * PAGES

    def teardown(self) -> None:
        self.agent.close()

    def _flip(self, first: int, n: int, to_private: bool) -> None:
        for p in range(first, min(PAGES, first + n)):
            if self.private[p] != to_private:
                self.private[p] = to_private
                self.content[p] = 0

    @rule(vcpu=vcpus, first=pages, n=lengths, to_private=st.booleans())
    def guest_converts(self, vcpu: int, first: int, n: int, to_private: bool) -> None:
        n = min(n, PAGES - first)
        ret, _ = self.agent.call(vcpu, MAP, first, n, int(to_private))
        assert ret == 0, f"MAP_GPA_RANGE returned {ret:#x}"
        self._flip(first, n, to_private)

    @rule(first=pages, n=lengths, to_private=st.booleans())
    def host_converts(self, first: int, n: int, to_private: bool) -> None:
        n = min(n, PAGES - first)
        handlers = self.agent.m.handlers
        assert isinstance(handlers, PrivateMemoryHandlers) and self.agent.m.converter is not None
        with handlers.lock:
            self.agent.m.converter.convert(BASE + first * PAGE, n * PAGE, to_private)
        self._flip(first, n, to_private)

    @rule(first=pages, n=lengths)
    def host_punches(self, first: int, n: int) -> None:
        n = min(n, PAGES - first)
        assert self.agent.m.converter is not None
        self.agent.m.converter.punch(BASE + first * PAGE, n * PAGE)
        for p in range(first, first + n):
            if self.private[p]:
                self.content[p] = 0

    @rule(vcpu=vcpus, first=pages, n=lengths, value=patterns)
    def guest_writes(self, vcpu: int, first: int, n: int, value: int) -> None:
        n = min(n, PAGES - first)
        assert self.agent.call(vcpu, WRITE, first, n, value) == (0, 0)
        self.content[first : first + n] = [value] * n

    @precondition(lambda self: not all(self.private))
    @rule(first=pages, value=patterns)
    def host_writes_shared_page(self, first: int, value: int) -> None:
        p = next(q % PAGES for q in range(first, first + PAGES) if not self.private[q % PAGES])
        self.agent.m.memory.write(BASE + p * PAGE, bytes([value]) * PAGE)
        self.content[p] = value

    @rule(vcpu=vcpus)
    def guest_sees_model(self, vcpu: int) -> None:
        p = 0
        while p < PAGES:  # one CHECK per run of equal content
            q = p
            while q < PAGES and self.content[q] == self.content[p]:
                q += 1
            offset, found = self.agent.call(vcpu, CHECK, p, q - p, self.content[p])
            assert offset == 0, (
                f"vCPU {vcpu} sees {found:#x} at page {p + (offset - 1) // PAGE}, model says "
                f"{self.content[p]:#x} ({'private' if self.private[p] else 'shared'})"
            )
            p = q

    @invariant()
    def host_sees_shared_pages(self) -> None:
        view = self.agent.m.memory.read(BASE, PAGES * PAGE)
        for p in range(PAGES):
            if not self.private[p]:
                page = view[p * PAGE : (p + 1) * PAGE]
                assert page.count(self.content[p]) == PAGE, f"host sees {page[0]:#x} at shared page {p}"

    @invariant()
    def map_matches_model(self) -> None:
        conv = self.agent.m.converter
        assert conv is not None
        assert [conv.is_private(BASE + p * PAGE) for p in range(PAGES)] == self.private


def test_private_memory_model(private_kvm: Kvm) -> None:
    """Random sequences from two vCPUs and the host agree with the page model at every step."""
    require_private_mem(private_kvm)
    PrivateMemoryModel.kvm = private_kvm
    run = PrivateMemoryModel.TestCase
    run.settings = settings(
        max_examples=12, stateful_step_count=25, deadline=None, suppress_health_check=list(HealthCheck)
    )
    run().runTest()
