"""Binary stats, ported from the kernel's tools/testing/selftests/kvm/kvm_binary_stats_test.c:
stats_test() on every VM and vCPU stats fd of DEFAULT_NUM_VM VMs with DEFAULT_NUM_VCPU vCPUs each
(header and id sanity, descriptor flags, exponents, sizes and bucket sizes, no overlap between the
descriptor and data blocks, offsets inside the data block, values readable in bulk and one by
one, the fd really closed), plus what vmm.kvm.stats adds: names unique, stats that move when a
guest runs, and a closed stats fd refusing reads."""

from __future__ import annotations

import ctypes
import fcntl
import os

import pytest

from vmm import Kvm, Machine, Vm, load_guest
from vmm.errors import VmmError
from vmm.kvm import Cap, Stats, uapi
from vmm.kvm.uapi import StatsBase, StatsType, StatsUnit
from vmm.tools.pytest_plugin import require

from helpers import expect_done

DEFAULT_NUM_VM = 4
DEFAULT_NUM_VCPU = 4
HEADER_SIZE = ctypes.sizeof(uapi.kvm_stats_header)


def stats_test(stats: Stats) -> None:
    """The kernel's stats_test(), on vmm's decoded view and on the raw fd."""
    h = stats.header
    size_desc = ctypes.sizeof(uapi.kvm_stats_desc) + h.name_size
    # the id string starts with "kvm" and is NUL-terminated inside name_size
    assert stats.id.startswith("kvm") and len(stats.id) < h.name_size, f"invalid KVM stats id {stats.id!r}"
    assert h.flags == 0, f"header flags {h.flags:#x}: none are defined"
    assert h.num_desc > 0, "no KVM stats defined"
    assert h.desc_offset >= HEADER_SIZE and h.data_offset >= HEADER_SIZE, "invalid offset fields in header"
    assert h.desc_offset > h.data_offset or h.desc_offset + size_desc * h.num_desc <= h.data_offset, (
        "descriptor block overlaps the data block"
    )
    size_data = 0
    for d in stats:
        assert d.type <= StatsType.MAX, f"{d.name}: unknown KVM stats type {d.type:#x}"
        assert d.unit <= StatsUnit.MAX, f"{d.name}: unknown KVM stats unit {d.unit:#x}"
        assert d.base <= StatsBase.MAX, f"{d.name}: unknown KVM stats base {d.base:#x}"
        assert not d.flags & ~(uapi.KVM_STATS_TYPE_MASK | uapi.KVM_STATS_UNIT_MASK | uapi.KVM_STATS_BASE_MASK)
        if d.unit in (StatsUnit.NONE, StatsUnit.BYTES, StatsUnit.CYCLES):
            assert d.exponent >= 0, f"{d.name}: exponent {d.exponent} for a count, bytes or cycles"
        elif d.unit == StatsUnit.SECONDS:
            assert d.exponent <= 0, f"{d.name}: exponent {d.exponent} for seconds"
        assert d.name and len(d.name) < h.name_size, f"KVM stats name {d.name!r} too long"
        assert d.size, f"KVM descriptor {d.name} with size of 0"
        if d.type == StatsType.LINEAR_HIST:
            assert d.bucket_size, f"bucket size of linear histogram {d.name} is zero"
        else:
            assert not d.bucket_size, f"bucket size of {d.name} is not zero"
        size_data += d.size * 8
    assert h.data_offset >= h.desc_offset or h.data_offset + size_data <= h.desc_offset, (
        "data block overlaps the descriptor block"
    )
    assert size_data >= h.num_desc * 8, "data size is not correct"
    for d in stats:
        assert d.offset < size_data, f"invalid offset {d.offset} for {d.name}"
    # beyond the C test: every stat inside the block vmm reads, and no two stats share bytes
    assert stats.data_size <= size_data
    spans = sorted((d.offset, d.offset + 8 * d.size, d.name) for d in stats)
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        assert end <= start, f"{a} and {b} overlap in the data block"
    names = [d.name for d in stats]
    assert len(set(names)) == len(names), f"duplicate stat names: {sorted(n for n in names if names.count(n) > 1)}"
    # values readable as one block and one by one (the kernel test's two read passes)
    assert len(os.pread(stats.fd, size_data, h.data_offset)) == size_data
    for d in stats:
        assert len(os.pread(stats.fd, d.size * 8, h.data_offset + d.offset)) == d.size * 8, d.name
    snap = stats.read()
    for d in stats:
        assert len(snap.histogram(d.name)) == d.size


def closed_fd_freed(stats: Stats) -> None:
    """The kernel test's TEST_ASSERT(fcntl(stats_fd, F_GETFD) == -1, "Stats fd not freed")."""
    fd = stats.fd
    stats.close()
    with pytest.raises(OSError):
        fcntl.fcntl(fd, fcntl.F_GETFD)


def test_binary_stats(kvm: Kvm) -> None:
    """main(): DEFAULT_NUM_VM VMs x DEFAULT_NUM_VCPU vCPUs, every stats fd checked and closed."""
    require(kvm.check_extension(Cap.BINARY_STATS_FD) > 0, "KVM_CAP_BINARY_STATS_FD")
    vms = [kvm.create_vm() for _ in range(DEFAULT_NUM_VM)]
    try:
        vcpus = [[vm.create_vcpu(j) for j in range(DEFAULT_NUM_VCPU)] for vm in vms]
        for vm, its_vcpus in zip(vms, vcpus):
            with vm.stats() as s:
                stats_test(s)
                assert s.id == f"kvm-{os.getpid()}", s.id
                closed_fd_freed(s)
            for v in its_vcpus:
                with v.stats() as s:
                    stats_test(s)
                    assert s.id == f"kvm-{os.getpid()}/vcpu-{v.id}", s.id
                    closed_fd_freed(s)
                v.close()
    finally:
        for vm in vms:
            vm.close()


@pytest.mark.beyond_kernel
def test_stats_move_when_a_guest_runs(kvm: Kvm) -> None:
    """A guest's exits show in its vCPU's ``exits`` and its page faults in the VM's MMU counters:
    the values are live, not a copy taken when the fd was opened."""
    require(kvm.check_extension(Cap.BINARY_STATS_FD) > 0, "KVM_CAP_BINARY_STATS_FD")
    with Machine(kvm=kvm) as m, m.vm.stats() as vm_stats, m.vcpus[0].stats() as vcpu_stats:
        before_vm, before_vcpu = vm_stats.read(), vcpu_stats.read()
        m.load(load_guest("hello"))
        expect_done(m.run_all(timeout=10)[0])
        vcpu_delta = vcpu_stats.read() - before_vcpu
        assert vcpu_delta.get("exits", 0) > 0, vcpu_delta  # (kvm_pvm counts its PIO exits as insn_emulation)
        # which VM counters move depends on the MMU: the TDP MMU (nested kernels) counts its
        # mappings in pages_4k/2m/1g; this host's kvm_pvm shadow-pages and counts mmu_pte_write
        vm_delta = vm_stats.read() - before_vm
        assert vm_delta, "no VM stat moved while a guest faulted its memory in"


@pytest.mark.beyond_kernel
def test_stats_bad_names_and_closed_fd(vm: Vm) -> None:
    """An unknown stat name is a VmmError naming the fd's id; a closed stats fd refuses reads."""
    s = vm.stats()
    with pytest.raises(VmmError, match=s.id):
        s.read()["no_such_stat"]
    assert "pages_4k" in s and "no_such_stat" not in s
    s.close()
    with pytest.raises(ValueError, match="closed stats fd"):
        s.read()
