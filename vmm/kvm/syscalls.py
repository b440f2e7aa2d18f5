"""The few libc calls Python's os/mmap modules lack: fallocate with a mode, and mincore."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
PAGE_SIZE = mmap.PAGESIZE
_LOW_BIT = bytes(b & 1 for b in range(256))  # mincore's vector: bit 0 = resident, others reserved


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); raises OSError with errno on failure."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def address_of(m: mmap.mmap) -> int:
    """Host virtual address of an mmap object (what KVM's userspace_addr wants)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def resident_bytes(addr: int, length: int) -> int:
    """Bytes of [addr, addr+length) whose pages are in the page cache of the mapped file (mincore)."""
    pages = (length + PAGE_SIZE - 1) // PAGE_SIZE
    vec = (ctypes.c_ubyte * pages)()
    if _libc.mincore(addr, length, vec) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return bytes(vec).translate(_LOW_BIT).count(1) * PAGE_SIZE


def meminfo(field: str) -> int:
    """A /proc/meminfo field in bytes (e.g. 'Unevictable', where guest_memfd pages are counted)."""
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name == field:
                return int(rest.split()[0]) * 1024
    raise KeyError(field)
