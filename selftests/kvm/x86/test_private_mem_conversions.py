"""Port of tools/testing/selftests/kvm/x86_64/private_mem_conversions_test.c.

guest/private_mem_conversions.S converts ranges {0,4K}, {0,2M}, {4K,4K}, {4K,2M}, {2M,4K} of a
2M+4K window with KVM_HC_MAP_GPA_RANGE, with and without discard (the kernel's "fallocate" pass),
re-shares odd pages, and runs the punch-hole test. After each step the host checks that it sees
only shared data, the guest checks its private data. Variants: N vCPUs converting concurrently,
each in its own window, and one guest_memfd split over M memslots.

One deliberate difference: vmm's conversions discard the shared side when a range turns private
(as QEMU does), so where the kernel's host expects stale shared data after a private period, ours
expects zeros in the discarding pass. The host reads a private range through
GuestMemory.shared_views (its shared backing, on purpose: plain views refuse private ranges)."""

from __future__ import annotations

import pytest

from vmm import ConversionPolicy, Kvm, Machine, PrivateMemoryHandlers, Ucall, UcallCmd, VmType, load_guest

pytestmark = pytest.mark.private_mem

BASE_DATA_GPA = 1 << 32
DATA_SIZE = (2 << 20) + 4096
PER_CPU_SIZE = 4 << 20  # DATA_SIZE aligned up to 2M
SYNC_SHARED, SYNC_PRIVATE, SYNC_POLICY, SYNC_PUNCH = range(4)
PASSES = {0: ConversionPolicy(discard=False), 1: ConversionPolicy(discard=True, preallocate=True)}


def host_check(m: Machine, uc: Ucall) -> None:
    """The kernel test's host side: compare the shared view, write the new pattern, punch, switch pass."""
    handlers = m.handlers
    assert isinstance(handlers, PrivateMemoryHandlers) and m.converter is not None
    kind, gpa, size, pattern, new, through_private = uc.args
    if kind == SYNC_POLICY:
        handlers.policy_for[uc.vcpu_id] = PASSES[gpa]
        return
    if kind == SYNC_PUNCH:
        m.converter.punch_hole(gpa, size)
        return
    assert kind in (SYNC_SHARED, SYNC_PRIVATE), f"unknown sync {kind}"
    policy = handlers.policy_for.get(uc.vcpu_id, m.converter.policy)
    expected = 0 if through_private and policy.discard else pattern
    views = m.memory.shared_views if kind == SYNC_PRIVATE else m.memory.views  # views() refuses private
    for piece_gpa, view in views(gpa, size):
        data = bytes(view)
        if data.count(expected) != len(data):
            bad = next(i for i, b in enumerate(data) if b != expected)
            pytest.fail(
                f"vCPU {uc.vcpu_id}: host expected {expected:#x} at gpa {piece_gpa + bad:#x}, got {data[bad]:#x}"
            )
        if kind == SYNC_SHARED:
            view[:] = bytes([new]) * len(view)


def run_conversions(kvm: Kvm, nr_vcpus: int, nr_memslots: int) -> None:
    """test_mem_conversions(): one guest_memfd over M memslots, N vCPUs each in its own window."""
    size = PER_CPU_SIZE * nr_vcpus
    with Machine(kvm=kvm, vm_type=VmType.SW_PROTECTED, vcpus=nr_vcpus) as m:
        regions = m.add_private_memory(BASE_DATA_GPA, size, slots=nr_memslots)
        m.load(load_guest("private_mem_conversions"), arg=BASE_DATA_GPA)
        assert regions[0].gmem is not None
        with regions[0].gmem.dup() as gmem:  # every slot holds its own fd of the one guest_memfd
            try:
                results = m.run_all(timeout=300, on_sync=lambda uc: host_check(m, uc))
                assert all(isinstance(r, Ucall) and r.cmd == UcallCmd.DONE for r in results)
                assert m.converter is not None and m.converter.stats.conversions > 0
            finally:
                m.close()
            # the guest_memfd keeps its VM alive: it still allocates and punches after the VM is gone
            gmem.punch_hole(0, size)
            gmem.allocate(0, size)


def test_private_mem_conversions(private_kvm: Kvm) -> None:
    """private_mem_conversions_test (defaults): one vCPU, one memslot."""
    run_conversions(private_kvm, nr_vcpus=1, nr_memslots=1)


@pytest.mark.parametrize("nr_vcpus", [2, 3])
def test_private_mem_conversions_vcpus(private_kvm: Kvm, nr_vcpus: int) -> None:
    """private_mem_conversions_test -n N: vCPUs convert their own windows concurrently. (With -n 4
    on the 2-CPU nested kernel under TCG, one run in about six ended in a triple fault whose state
    SVM had already reset; under investigation, see the closing note of issue 4.)"""
    run_conversions(private_kvm, nr_vcpus=nr_vcpus, nr_memslots=1)


@pytest.mark.parametrize("nr_vcpus, nr_memslots", [(1, 2), (2, 4)])
def test_private_mem_conversions_memslots(private_kvm: Kvm, nr_vcpus: int, nr_memslots: int) -> None:
    """private_mem_conversions_test -n N -m M: one guest_memfd split over M memslots."""
    run_conversions(private_kvm, nr_vcpus=nr_vcpus, nr_memslots=nr_memslots)
