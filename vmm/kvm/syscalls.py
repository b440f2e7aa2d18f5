"""The libc calls Python's os/mmap modules lack, in one place (the kernel selftests'
include/kvm_syscalls.h): each is built on ``_call()``, so every failure is an OSError with errno."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long

HOST_PAGE_SIZE = mmap.PAGESIZE  # the host's page (mincore's unit); the guest's 4K is vmm.memory's PAGE_SIZE
_MAP_FAILED = ctypes.c_void_p(-1).value
_LOW_BIT = bytes(b & 1 for b in range(256))  # mincore's vector: bit 0 = resident, others reserved

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
# <sys/mman.h>
MAP_FIXED = 0x10
MADV_DONTNEED, MADV_HUGEPAGE, MADV_COLLAPSE = 4, 14, 25
# <linux/mempolicy.h>
MPOL_DEFAULT, MPOL_BIND, MPOL_INTERLEAVE = 0, 2, 3
MPOL_F_ADDR = 1 << 1
MAX_NODE = 64  # bits in the one-word node masks mbind/get_mempolicy take here
# <asm/unistd_64.h>
SYS_MBIND, SYS_GET_MEMPOLICY, SYS_MOVE_PAGES, SYS_USERFAULTFD = 237, 239, 279, 323


def _call(what: str, func: Any, *args: Any) -> int:
    """Call a libc function; its failure convention (-1, or MAP_FAILED from mmap) becomes OSError
    with errno and ``what`` in the message."""
    ret = func(*args)
    if ret == -1 or ret == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return int(ret or 0)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os.posix_fallocate has none)."""
    _call("fallocate", _libc.fallocate, fd, mode, offset, length)


def address_of(m: mmap.mmap) -> int:
    """Host virtual address of an mmap object (what KVM's userspace_addr wants)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def resident_bytes(addr: int, length: int) -> int:
    """Bytes of [addr, addr+length) whose pages are in the page cache of the mapped file (mincore)."""
    pages = (length + HOST_PAGE_SIZE - 1) // HOST_PAGE_SIZE
    vec = (ctypes.c_ubyte * pages)()
    _call("mincore", _libc.mincore, addr, length, vec)
    return bytes(vec).translate(_LOW_BIT).count(1) * HOST_PAGE_SIZE


def raw_mmap(length: int, prot: int, flags: int, fd: int = -1, addr: int | None = None) -> int:
    """mmap(2) without Python's size check (a mapping may run past the end of the file, or sit at
    a fixed address); returns the address. Undo with munmap()."""
    return _call("mmap", _libc.mmap, addr, length, prot, flags, fd, 0)


def munmap(addr: int, length: int) -> None:
    """munmap(2) of what raw_mmap() returned."""
    _call("munmap", _libc.munmap, addr, length)


@contextmanager
def raw_mapping(length: int, prot: int, flags: int, fd: int = -1, addr: int | None = None) -> Iterator[int]:
    """raw_mmap() for the length of a ``with`` block: yields the address, unmaps at the end."""
    mem = raw_mmap(length, prot, flags, fd, addr)
    try:
        yield mem
    finally:
        munmap(mem, length)


def madvise(addr: int, length: int, advice: int) -> None:
    """madvise(2) on an address (mmap.mmap.madvise wants a Python mapping)."""
    _call("madvise", _libc.madvise, addr, length, advice)


def mbind(addr: int, length: int, mode: int, nodemask: int) -> None:
    """mbind(2): the NUMA policy ``mode`` over [addr, addr+length) for the nodes set in ``nodemask``."""
    mask = ctypes.c_ulong(nodemask)
    _call(
        "mbind",
        _libc.syscall,
        SYS_MBIND,
        ctypes.c_void_p(addr),
        ctypes.c_ulong(length),
        ctypes.c_int(mode),
        ctypes.byref(mask) if nodemask else None,
        ctypes.c_ulong(MAX_NODE if nodemask else 0),
        ctypes.c_uint(0),
    )


def get_mempolicy(addr: int) -> tuple[int, int]:
    """get_mempolicy(2) with MPOL_F_ADDR: the (policy, nodemask) covering ``addr``."""
    policy, mask = ctypes.c_int(-1), ctypes.c_ulong(0)
    _call(
        "get_mempolicy",
        _libc.syscall,
        SYS_GET_MEMPOLICY,
        ctypes.byref(policy),
        ctypes.byref(mask),
        ctypes.c_ulong(MAX_NODE),
        ctypes.c_void_p(addr),
        ctypes.c_ulong(MPOL_F_ADDR),
    )
    return policy.value, mask.value


def page_nodes(addrs: list[int]) -> list[int]:
    """move_pages(2) without target nodes: the NUMA node each page is on (or -errno per page)."""
    pages = (ctypes.c_void_p * len(addrs))(*addrs)
    status = (ctypes.c_int * len(addrs))()
    _call("move_pages", _libc.syscall, SYS_MOVE_PAGES, 0, ctypes.c_ulong(len(addrs)), pages, None, status, 0)
    return list(status)


def userfaultfd(flags: int) -> int:
    """userfaultfd(2): a new userfaultfd (no libc wrapper); vmm.kvm.uffd wraps it as a Userfaultfd."""
    return _call("userfaultfd", _libc.syscall, SYS_USERFAULTFD, ctypes.c_int(flags))


def meminfo(field: str) -> int:
    """A /proc/meminfo field in bytes (e.g. 'Unevictable', where guest_memfd pages are counted)."""
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name == field:
                return int(rest.split()[0]) * 1024
    raise KeyError(field)
