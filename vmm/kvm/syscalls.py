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
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong]
_libc.process_vm_readv.argtypes += [ctypes.c_ulong]  # pid, local iov and count, remote iov and count, flags

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
# <asm-generic/siginfo.h>: si_code of a SIGBUS for a memory error (action required / optional)
BUS_MCEERR_AR, BUS_MCEERR_AO = 4, 5
SA_SIGINFO, SA_ONSTACK = 0x4, 0x08000000
# <linux/prctl.h>: the memory-corruption kill policy (PR_MCE_KILL)
PR_MCE_KILL, PR_MCE_KILL_SET = 33, 1
PR_MCE_KILL_LATE, PR_MCE_KILL_EARLY, PR_MCE_KILL_DEFAULT = 0, 1, 2
# <asm/unistd_64.h>
SYS_MBIND, SYS_GET_MEMPOLICY, SYS_MOVE_PAGES, SYS_SECCOMP, SYS_USERFAULTFD = 237, 239, 279, 317, 323
# <linux/prctl.h>, <linux/seccomp.h>
PR_SET_NO_NEW_PRIVS, SECCOMP_SET_MODE_FILTER = 38, 1


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


class _iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def process_vm_readv(pid: int, addr: int, size: int) -> bytes:
    """``size`` bytes at ``addr`` in process ``pid`` (process_vm_readv(2): one syscall, no ptrace
    word loop); fewer when the range runs into an unmapped page."""
    buf = ctypes.create_string_buffer(size)
    local, remote = _iovec(ctypes.addressof(buf), size), _iovec(addr, size)
    n = _call("process_vm_readv", _libc.process_vm_readv, pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    return buf.raw[:n]


class _sock_fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_filter(program: bytes) -> None:
    """Install a classic-BPF seccomp filter (``program``: struct sock_filter[], 8 bytes each) on
    this thread and its future children, after PR_SET_NO_NEW_PRIVS (which an unprivileged filter needs)."""
    _call("prctl", _libc.prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _sock_fprog(len(program) // 8, ctypes.addressof(buf))
    _call("seccomp", _libc.syscall, SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, 0, ctypes.byref(prog))


def set_mce_kill_policy(policy: int) -> None:
    """prctl(PR_MCE_KILL, PR_MCE_KILL_SET, policy): when memory_failure() signals this process for
    a page it maps (EARLY: at once, LATE: on access, DEFAULT: vm.memory_failure_early_kill)."""
    _call(
        "prctl", _libc.prctl, PR_MCE_KILL, PR_MCE_KILL_SET, ctypes.c_ulong(policy), ctypes.c_ulong(0), ctypes.c_ulong(0)
    )


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


def smaps_field(addr: int, field: str) -> int:
    """A /proc/self/smaps field in bytes for the mapping holding ``addr`` (e.g. 'ShmemPmdMapped':
    how much of a memfd mapping the host maps with 2M PMDs, which is what KVM's huge mappings follow)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                start, _, end = head.partition("-")
                inside = int(start, 16) <= addr < int(end, 16)
            elif inside and head == field + ":":
                return int(line.split()[1]) * 1024
    raise KeyError(f"{field} of the mapping at {addr:#x}")


class siginfo_t(ctypes.Structure):
    """The part of x86-64 siginfo_t a SIGBUS fills: si_addr and si_addr_lsb (the union at 16)."""

    _fields_ = [
        ("si_signo", ctypes.c_int),
        ("si_errno", ctypes.c_int),
        ("si_code", ctypes.c_int),
        ("_pad", ctypes.c_int),
        ("si_addr", ctypes.c_uint64),
        ("si_addr_lsb", ctypes.c_short),
        ("_rest", ctypes.c_char * 102),
    ]


class _sigaction(ctypes.Structure):
    """glibc's struct sigaction on x86-64 (handler, 1024-bit mask, flags, restorer)."""

    _fields_ = [
        ("sa_handler", ctypes.c_void_p),
        ("sa_mask", ctypes.c_uint64 * 16),
        ("sa_flags", ctypes.c_int),
        ("sa_restorer", ctypes.c_void_p),
    ]


SIGINFO_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.POINTER(siginfo_t), ctypes.c_void_p)


def sigaction(signo: int, handler: Any) -> bytes:
    """sigaction(2) with SA_SIGINFO for a SIGINFO_HANDLER (the caller keeps it alive); returns the
    previous action, for restore_sigaction()."""
    new, old = _sigaction(), _sigaction()
    new.sa_handler = ctypes.cast(handler, ctypes.c_void_p)
    new.sa_flags = SA_SIGINFO | SA_ONSTACK
    _call("sigaction", _libc.sigaction, signo, ctypes.byref(new), ctypes.byref(old))
    return bytes(old)


def sigaction_handler(signo: int) -> int:
    """The address of the handler now installed for ``signo`` (0: SIG_DFL, 1: SIG_IGN)."""
    now = _sigaction()
    _call("sigaction", _libc.sigaction, signo, None, ctypes.byref(now))
    return int(now.sa_handler or 0)


def restore_sigaction(signo: int, previous: bytes) -> None:
    """Put back an action sigaction() returned."""
    old = _sigaction.from_buffer_copy(previous)
    _call("sigaction", _libc.sigaction, signo, ctypes.byref(old), None)
