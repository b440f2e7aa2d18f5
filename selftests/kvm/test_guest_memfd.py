"""guest_memfd as a file, ported from the kernel's tools/testing/selftests/kvm/guest_memfd_test.c:
every case of the 6.12 test, and the cases newer mainline adds for GUEST_MEMFD_FLAG_MMAP and
GUEST_MEMFD_FLAG_INIT_SHARED (6.18). Like mainline, each file case runs on every VM type and for
every flag set (none, MMAP, MMAP|INIT_SHARED) the VM's KVM_CAP_GUEST_MEMFD_FLAGS allows; which
flags are valid follows that capability, not the kernel version (the 6.12 test's "every flag is
EINVAL" fails on 6.18 for exactly that reason)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmm import Cap, GmemFlag, GuestMemfd, Kvm, Machine, Ucall, UcallCmd, Vm, VmType, load_guest
from vmm.kvm import syscalls
from vmm.kvm.syscalls import (
    MADV_COLLAPSE,
    MADV_DONTNEED,
    MADV_HUGEPAGE,
    MAP_FIXED,
    MPOL_BIND,
    MPOL_DEFAULT,
    MPOL_INTERLEAVE,
    get_mempolicy,
    madvise,
    mbind,
    page_nodes,
    raw_mapping,
)
from vmm.tools.pytest_plugin import require, require_gmem_flags, require_private_mem

from helpers import expect_sync

PAGE_SIZE = syscalls.HOST_PAGE_SIZE  # the kernel test's page_size = getpagesize()
TOTAL_SIZE = 4 * PAGE_SIZE  # gmem_test()'s page_size * 4
MMAP, INIT_SHARED = int(GmemFlag.MMAP), int(GmemFlag.INIT_SHARED)
FLAG_SETS = {"no_flags": 0, "mmap": MMAP, "mmap_init_shared": MMAP | INIT_SHARED}
SZ_4G = 1 << 32

PROT_NONE, PROT_RW = 0, mmap.PROT_READ | mmap.PROT_WRITE


def numa_nodes() -> set[int]:
    return {int(p.name[4:]) for p in Path("/sys/devices/system/node").glob("node[0-9]*")}


def expect_failure(call: Callable[[], object], why: str, err: int | None = None) -> None:
    """``call`` must fail (the kernel's TEST_ASSERT(ret, ...)), with ``err`` if given."""
    with pytest.raises(OSError) as e:
        call()
    if err is not None:
        assert e.value.errno == err, f"{why}: expected {errno.errorcode[err]}, got {e.value}"


# A child process does the faulting accesses, so the SIGBUS they must raise kills it, not pytest.
_FAULT_CHILD = """
import ctypes, sys
fd, map_size, access, offset = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
mem = libc.mmap(None, map_size, 3, 1, fd, 0)  # PROT_READ|PROT_WRITE, MAP_SHARED
if mem in (None, ctypes.c_void_p(-1).value):
    sys.exit(f"mmap failed: errno {ctypes.get_errno()}")
if access == "memset":
    ctypes.memset(mem, 0xaa, map_size)
else:
    ctypes.string_at(mem + offset, 1)
"""


def expect_sigbus(gmem: GuestMemfd, map_size: int, access: str, offset: int = 0) -> None:
    """TEST_EXPECT_SIGBUS(): ``access`` ("memset" of the whole mapping, or "read" of one byte at
    ``offset``) through a MAP_SHARED mapping of ``map_size`` bytes dies of SIGBUS."""
    proc = subprocess.run(
        [sys.executable, "-c", _FAULT_CHILD, str(gmem.fd), str(map_size), access, str(offset)],
        pass_fds=(gmem.fd,),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGBUS, (
        f"{access} at {offset:#x} of a {map_size:#x}-byte mapping of a {gmem.size:#x}-byte guest_memfd: "
        f"expected SIGBUS, child exited with {proc.returncode} {proc.stderr.strip()}"
    )


# --- fixtures: the VM-type x flag-set matrix of mainline's test_guest_memfd() ------------------


@pytest.fixture(params=[VmType.DEFAULT, VmType.SW_PROTECTED], ids=["default_vm", "sw_protected_vm"])
def gmem_vm(request: pytest.FixtureRequest, kvm: Kvm) -> Iterator[Vm]:
    """A VM of each type that has guest_memfd (mainline loops over KVM_CAP_VM_TYPES)."""
    require(kvm.check_extension(Cap.GUEST_MEMFD) > 0, "KVM_CAP_GUEST_MEMFD")
    if request.param == VmType.SW_PROTECTED:
        require_private_mem(kvm)
    with kvm.create_vm(request.param) as vm:
        yield vm


@pytest.fixture(params=list(FLAG_SETS.values()), ids=list(FLAG_SETS))
def gmem_flags(request: pytest.FixtureRequest, gmem_vm: Vm) -> int:
    """Each flag set __test_guest_memfd() runs with, if the VM's KVM_CAP_GUEST_MEMFD_FLAGS has it."""
    require_gmem_flags(gmem_vm, request.param)
    return request.param


@pytest.fixture
def gmem(gmem_vm: Vm, gmem_flags: int) -> Iterator[GuestMemfd]:
    """gmem_test(): a fresh guest_memfd of TOTAL_SIZE with the flag set under test."""
    with gmem_vm.create_guest_memfd(TOTAL_SIZE, gmem_flags) as g:
        yield g


def create(vm: Vm, flags: int, size: int = TOTAL_SIZE) -> GuestMemfd:
    """A guest_memfd with exactly ``flags``, after checking the VM offers them."""
    require_gmem_flags(vm, flags)
    return vm.create_guest_memfd(size, flags)


# --- creation -----------------------------------------------------------------------------------


def test_guest_memfd_flags(gmem_vm: Vm) -> None:
    """guest_memfd_test.c: test_guest_memfd_flags() (mainline; the flag half of 6.12's
    test_create_guest_memfd_invalid()). Each of the 64 flag bits alone: accepted when the VM's
    KVM_CAP_GUEST_MEMFD_FLAGS has it, EINVAL otherwise."""
    valid = gmem_vm.check_extension(Cap.GUEST_MEMFD_FLAGS)
    for bit in range(64):
        flag = 1 << bit
        if flag & valid:
            gmem_vm.create_guest_memfd(PAGE_SIZE, flag).close()
        else:
            expect_failure(lambda: gmem_vm.create_guest_memfd(PAGE_SIZE, flag), f"flag {flag:#x}", errno.EINVAL)


def test_create_guest_memfd_invalid_sizes(gmem_vm: Vm, gmem_flags: int) -> None:
    """guest_memfd_test.c: test_create_guest_memfd_invalid_sizes() (the size half of 6.12's
    test_create_guest_memfd_invalid()). Every size 1..PAGE_SIZE-1 is EINVAL; so is 0 (not in the
    kernel test: kvm_gmem_create() refuses size <= 0). Kernel cases plus that extra one, so not
    marked beyond_kernel."""
    for size in range(0, PAGE_SIZE):
        expect_failure(lambda: gmem_vm.create_guest_memfd(size, gmem_flags), f"size {size:#x}", errno.EINVAL)


def test_create_guest_memfd_multiple(gmem_vm: Vm) -> None:
    """guest_memfd_test.c: test_create_guest_memfd_multiple(). Two guest_memfds of one VM keep
    their own sizes and are different inodes."""
    with gmem_vm.create_guest_memfd(PAGE_SIZE) as first, gmem_vm.create_guest_memfd(2 * PAGE_SIZE) as second:
        st1 = os.fstat(first.fd)
        assert st1.st_size == PAGE_SIZE
        st2 = os.fstat(second.fd)
        assert st2.st_size == 2 * PAGE_SIZE
        st1 = os.fstat(first.fd)
        assert st1.st_size == PAGE_SIZE, "first guest_memfd's size changed"
        assert st1.st_ino != st2.st_ino


# --- the file ------------------------------------------------------------------------------------


def test_file_read_write(gmem: GuestMemfd) -> None:
    """guest_memfd_test.c: test_file_read_write(). read, write, pread and pwrite all fail."""
    buf = bytes(64)
    expect_failure(lambda: os.read(gmem.fd, len(buf)), "read")
    expect_failure(lambda: os.write(gmem.fd, buf), "write")
    expect_failure(lambda: os.pread(gmem.fd, len(buf), 0), "pread")
    expect_failure(lambda: os.pwrite(gmem.fd, buf, 0), "pwrite")


def test_file_size(gmem: GuestMemfd) -> None:
    """guest_memfd_test.c: test_file_size(). fstat reports the created size and a page blksize."""
    st = os.fstat(gmem.fd)
    assert st.st_size == TOTAL_SIZE
    assert st.st_blksize == PAGE_SIZE


def test_fallocate(gmem: GuestMemfd) -> None:
    """guest_memfd_test.c: test_fallocate(). Allocating the whole file works; an unaligned offset
    or length fails; allocating at or past the end fails while punching there succeeds; an aligned
    hole can be punched and allocated again."""
    gmem.allocate(0, TOTAL_SIZE)
    expect_failure(lambda: gmem.punch_hole(PAGE_SIZE - 1, PAGE_SIZE), "unaligned offset")
    expect_failure(lambda: gmem.allocate(TOTAL_SIZE, PAGE_SIZE), "allocate at total_size")
    expect_failure(lambda: gmem.allocate(TOTAL_SIZE + PAGE_SIZE, PAGE_SIZE), "allocate after total_size")
    gmem.punch_hole(TOTAL_SIZE, PAGE_SIZE)
    gmem.punch_hole(TOTAL_SIZE + PAGE_SIZE, PAGE_SIZE)
    expect_failure(lambda: gmem.punch_hole(PAGE_SIZE, PAGE_SIZE - 1), "unaligned length")
    gmem.punch_hole(PAGE_SIZE, PAGE_SIZE)
    gmem.allocate(PAGE_SIZE, PAGE_SIZE)


@pytest.mark.beyond_kernel
def test_fallocate_unsupported_modes(gmem: GuestMemfd) -> None:
    """Beyond the kernel test (kvm_gmem_fallocate()): only KEEP_SIZE and KEEP_SIZE|PUNCH_HOLE are
    accepted; plain allocation (mode 0), PUNCH_HOLE without KEEP_SIZE, COLLAPSE_RANGE, ZERO_RANGE
    and INSERT_RANGE are EOPNOTSUPP."""
    for mode in (0, 0x02, 0x08, 0x10, 0x20):
        expect_failure(
            lambda: syscalls.fallocate(gmem.fd, mode, 0, PAGE_SIZE), f"fallocate mode {mode:#x}", errno.EOPNOTSUPP
        )


def test_invalid_punch_hole(gmem: GuestMemfd) -> None:
    """guest_memfd_test.c: test_invalid_punch_hole(). PUNCH_HOLE with an offset or length that is
    not page aligned is EINVAL."""
    cases = [
        (0, 1),
        (0, PAGE_SIZE - 1),
        (0, PAGE_SIZE + 1),
        (1, 1),
        (1, PAGE_SIZE - 1),
        (1, PAGE_SIZE),
        (1, PAGE_SIZE + 1),
        (PAGE_SIZE, 1),
        (PAGE_SIZE, PAGE_SIZE - 1),
        (PAGE_SIZE, PAGE_SIZE + 1),
    ]
    for offset, length in cases:
        expect_failure(lambda: gmem.punch_hole(offset, length), f"offset {offset:#x} length {length:#x}", errno.EINVAL)


# --- mmap ---------------------------------------------------------------------------------------


def test_mmap_not_supported(gmem_vm: Vm) -> None:
    """guest_memfd_test.c: test_mmap_not_supported() (6.12: test_mmap()). Without
    GUEST_MEMFD_FLAG_MMAP neither one page nor the whole file can be mapped."""
    with gmem_vm.create_guest_memfd(TOTAL_SIZE, 0) as gmem:
        for length in (PAGE_SIZE, TOTAL_SIZE):
            expect_failure(lambda: mmap.mmap(gmem.fd, length, mmap.MAP_SHARED, PROT_RW), f"mmap of {length:#x} bytes")


@pytest.mark.parametrize("flags", [MMAP, MMAP | INIT_SHARED], ids=["mmap", "mmap_init_shared"])
def test_mmap_cow(gmem_vm: Vm, flags: int) -> None:
    """guest_memfd_test.c: test_mmap_cow(). Even a mappable guest_memfd refuses MAP_PRIVATE."""
    with create(gmem_vm, flags) as gmem:
        expect_failure(lambda: mmap.mmap(gmem.fd, TOTAL_SIZE, mmap.MAP_PRIVATE, PROT_RW), "MAP_PRIVATE mmap")


def test_mmap_supported(gmem_vm: Vm) -> None:
    """guest_memfd_test.c: test_mmap_supported(). With MMAP|INIT_SHARED, bytes written through a
    shared mapping read back; punching the first page makes it read zeros while the rest keeps
    its data; writing the page again restores it."""
    with create(gmem_vm, MMAP | INIT_SHARED) as gmem:
        mem = gmem.mmap()
        mem[:] = b"\xaa" * TOTAL_SIZE
        assert mem[:] == b"\xaa" * TOTAL_SIZE
        gmem.punch_hole(0, PAGE_SIZE)
        assert mem[:PAGE_SIZE] == bytes(PAGE_SIZE)
        assert mem[PAGE_SIZE:] == b"\xaa" * (TOTAL_SIZE - PAGE_SIZE)
        mem[:PAGE_SIZE] = b"\xaa" * PAGE_SIZE
        assert mem[:] == b"\xaa" * TOTAL_SIZE


def test_fault_overflow(gmem_vm: Vm) -> None:
    """guest_memfd_test.c: test_fault_overflow(). A mapping four times the file's size: writing all
    of it and reading the first byte past the end raise SIGBUS (in a child process), and the
    in-file part keeps what the write stored before it faulted."""
    with create(gmem_vm, MMAP | INIT_SHARED) as gmem:
        expect_sigbus(gmem, 4 * TOTAL_SIZE, "memset")
        expect_sigbus(gmem, 4 * TOTAL_SIZE, "read", TOTAL_SIZE)
        assert gmem.mmap()[:] == b"\xaa" * TOTAL_SIZE


def test_fault_private(gmem_vm: Vm) -> None:
    """guest_memfd_test.c: test_fault_private(). With MMAP but not INIT_SHARED the memory starts
    private: the mapping can be made but the first write or read of it raises SIGBUS."""
    with create(gmem_vm, MMAP) as gmem:
        expect_sigbus(gmem, TOTAL_SIZE, "memset")
        expect_sigbus(gmem, TOTAL_SIZE, "read", 0)


def test_collapse(gmem_vm: Vm) -> None:
    """guest_memfd_test.c: test_collapse(). A PMD-aligned mapping of a PMD-sized MMAP|INIT_SHARED
    guest_memfd accepts MADV_HUGEPAGE but refuses MADV_COLLAPSE (EINVAL); MADV_DONTNEED and a
    re-fault still work."""
    pmd_file = Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
    require(pmd_file.exists(), "transparent huge pages (CONFIG_TRANSPARENT_HUGEPAGE)")
    pmd_size = int(pmd_file.read_text())
    with (
        create(gmem_vm, MMAP | INIT_SHARED, pmd_size) as gmem,
        raw_mapping(2 * pmd_size, PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as reserved,
    ):
        aligned = -(-reserved // pmd_size) * pmd_size
        with raw_mapping(pmd_size, PROT_RW, MAP_FIXED | mmap.MAP_SHARED, gmem.fd, aligned) as mem:
            assert mem % pmd_size == 0
            for offset in range(0, pmd_size, PAGE_SIZE):  # reads: populate without dirtying
                ctypes.string_at(mem + offset, 1)
            madvise(mem, pmd_size, MADV_HUGEPAGE)
            expect_failure(lambda: madvise(mem, pmd_size, MADV_COLLAPSE), "MADV_COLLAPSE", errno.EINVAL)
            madvise(mem, pmd_size, MADV_DONTNEED)
            ctypes.string_at(mem, 1)


@pytest.mark.parametrize("flags", [MMAP, MMAP | INIT_SHARED], ids=["mmap", "mmap_init_shared"])
def test_mbind(gmem_vm: Vm, flags: int) -> None:
    """guest_memfd_test.c: test_mbind(). MPOL_INTERLEAVE and MPOL_BIND on node 0 over parts of the
    mapping read back with get_mempolicy(MPOL_F_ADDR); MPOL_DEFAULT over all of it resets them; an
    unknown policy is EINVAL. Mainline skips this on single-node hosts; node 0 exists everywhere,
    so it runs here on any host."""
    with create(gmem_vm, flags) as gmem:
        mem = syscalls.address_of(gmem.mmap())
        mbind(mem, 2 * PAGE_SIZE, MPOL_INTERLEAVE, 1)
        assert get_mempolicy(mem) == (MPOL_INTERLEAVE, 1)
        mbind(mem + 2 * PAGE_SIZE, 2 * PAGE_SIZE, MPOL_BIND, 1)
        assert get_mempolicy(mem + 2 * PAGE_SIZE) == (MPOL_BIND, 1)
        mbind(mem, TOTAL_SIZE, MPOL_DEFAULT, 0)
        assert get_mempolicy(mem) == (MPOL_DEFAULT, 0)
        expect_failure(lambda: mbind(mem, PAGE_SIZE, 999, 1), "invalid policy", errno.EINVAL)


def test_numa_allocation(gmem_vm: Vm) -> None:
    """guest_memfd_test.c: test_numa_allocation(). Pages faulted through the mapping land on the
    node their MPOL_BIND policy names, whether the policy was set before or after a first
    allocation, and again after punching everything and swapping the nodes."""
    require({0, 1} <= numa_nodes(), "NUMA nodes 0 and 1")
    node0, node1 = 1 << 0, 1 << 1
    with create(gmem_vm, MMAP | INIT_SHARED) as gmem:
        mem = gmem.mmap()
        base = syscalls.address_of(mem)
        pages = [base + i * PAGE_SIZE for i in range(4)]
        mem[:PAGE_SIZE] = b"\xaa" * PAGE_SIZE  # policy set after allocation...
        mbind(pages[0], PAGE_SIZE, MPOL_BIND, node0)
        gmem.punch_hole(0, PAGE_SIZE)
        mbind(pages[0], 2 * PAGE_SIZE, MPOL_BIND, node1)  # ...and before it
        mbind(pages[2], 2 * PAGE_SIZE, MPOL_BIND, node0)
        mem[:] = b"\xaa" * TOTAL_SIZE
        assert page_nodes(pages) == [1, 1, 0, 0]
        gmem.punch_hole(0, TOTAL_SIZE)
        mbind(pages[0], 2 * PAGE_SIZE, MPOL_BIND, node0)
        mbind(pages[2], 2 * PAGE_SIZE, MPOL_BIND, node1)
        mem[:] = b"\xaa" * TOTAL_SIZE
        assert page_nodes(pages) == [0, 0, 1, 1]


# --- a guest on guest_memfd memory --------------------------------------------------------------


def test_guest_memfd_guest(kvm: Kvm) -> None:
    """guest_memfd_test.c: test_guest_memfd_guest(). A default VM offers MMAP and INIT_SHARED; a
    guest reading a page of a guest_memfd-only slot at 4 GiB sees what the host wrote through the
    guest_memfd's mapping, and the host then sees what the guest wrote (guest/memory_rw.S: it checks
    0xaa.. like the kernel's guest_code() and writes the complement where the kernel writes 0xff).
    Mainline binds the slot with userspace_addr = NULL; on kvm_pvm hosts that access exits as MMIO,
    so the slot's userspace_addr is the guest_memfd's own mapping (which both kernels accept)."""
    require(kvm.check_extension(Cap.GUEST_MEMFD_FLAGS) != 0, "KVM_CAP_GUEST_MEMFD_FLAGS")
    pattern = 0xAAAAAAAAAAAAAAAA
    with Machine(kvm=kvm) as m:
        flags = m.vm.check_extension(Cap.GUEST_MEMFD_FLAGS)
        assert flags & MMAP, f"default VM type should support MMAP, supported flags = {flags:#x}"
        assert flags & INIT_SHARED, f"default VM type should support INIT_SHARED, supported flags = {flags:#x}"
        region = m.add_memory(SZ_4G, PAGE_SIZE, "guest_memfd-only", slot=1, gmem_flags=MMAP | INIT_SHARED)
        host = region.gmem.mmap()
        host[:] = pattern.to_bytes(8, "little") * (PAGE_SIZE // 8)
        m.load(load_guest("memory_rw"), arg=SZ_4G)
        assert expect_sync(m.run(timeout=5)).args[:2] == (1, pattern)
        assert expect_sync(m.run(timeout=5)).args[:2] == (2, ~pattern & (2**64 - 1))
        result = m.run(timeout=5)
        assert isinstance(result, Ucall) and result.cmd == UcallCmd.DONE, f"expected DONE, got {result}"
        assert host[:] == b"\x55" * PAGE_SIZE
