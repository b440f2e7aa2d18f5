"""vmm's attribute map (KVM cannot be asked for attributes, so the VMM keeps its own) against a
page-by-page model, driven by a hypothesis state machine; and its cost for a large sparse guest."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from vmm.kvm.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE
from vmm.memory.attributes import AttributeMap

pytestmark = pytest.mark.no_kvm  # pure host-side logic: not run again inside the nested kernel

PAGE = 4096
PAGES = 64  # the model covers this many pages; the map covers all 2**64 bytes
PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE


class AttributeMapMachine(RuleBasedStateMachine):
    """Random set() calls; after each, the map agrees with a list of per-page values."""

    def __init__(self) -> None:
        super().__init__()
        self.map = AttributeMap()
        self.model = [0] * PAGES

    @rule(first=st.integers(0, PAGES - 1), n=st.integers(1, PAGES), value=st.sampled_from([0, PRIVATE, 1]))
    def set_range(self, first: int, n: int, value: int) -> None:
        last = min(PAGES, first + n)
        self.map.set(first * PAGE, last * PAGE, value)
        self.model[first:last] = [value] * (last - first)

    @invariant()
    def lookups_agree(self) -> None:
        assert [self.map.get(p * PAGE) for p in range(PAGES)] == self.model
        assert self.map.get(PAGES * PAGE) == 0  # beyond the model nothing was set

    @invariant()
    def ranges_are_maximal_and_sorted(self) -> None:
        starts, values = list(self.map.starts), list(self.map.values)
        assert starts[0] == 0 and starts == sorted(set(starts))
        assert all(a != b for a, b in zip(values, values[1:]))
        ext = self.model + [0]
        assert len(starts) == 1 + sum(1 for a, b in zip(ext, ext[1:]) if a != b)

    @invariant()
    def uniform_and_ranges_match_model(self) -> None:
        for first in range(0, PAGES, 7):
            for last in (first + 1, min(PAGES, first + 9)):
                vals = set(self.model[first:last])
                expected = vals.pop() if len(vals) == 1 else None
                assert self.map.uniform(first * PAGE, last * PAGE) == expected
        covered = [(s, e, v) for s, e, v in self.map.ranges(0, PAGES * PAGE)]
        rebuilt = [v for s, e, v in covered for _ in range((e - s) // PAGE)]
        assert rebuilt == self.model


TestAttributeMap = AttributeMapMachine.TestCase
TestAttributeMap.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


def test_large_sparse_guest_costs_kilobytes() -> None:
    """A 64 GiB guest with 10,000 alternating private ranges: 20,000 boundaries, 16 bytes each."""
    m = AttributeMap()
    size, n = 64 << 30, 10_000
    step = size // (2 * n)
    for i in range(n):
        m.set(2 * i * step, (2 * i + 1) * step, PRIVATE)
    assert len(m) == 2 * n  # n private ranges from 0, each followed by a shared one
    assert m.nbytes() == 16 * 2 * n  # 312.5 KiB
    assert m.get(step // 2) == PRIVATE and m.get(step + step // 2) == 0
    m.set(0, size, 0)  # converting everything back collapses the map
    assert len(m) == 1
