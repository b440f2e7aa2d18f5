"""A guest_memfd: the file holding a VM's private memory, with allocate/punch_hole, dup and optional mmap."""

from __future__ import annotations

import mmap
import os

from . import syscalls
from .fd import KvmFd


class GuestMemfd(KvmFd):
    """One guest_memfd (KVM_CREATE_GUEST_MEMFD)."""

    kind = "guest_memfd"

    def __init__(self, fd: int, size: int, flags: int) -> None:
        super().__init__(fd)
        self.size = size
        self.flags = flags
        self.map: mmap.mmap | None = None  # this object's own MAP_SHARED mapping, made by mmap()

    def dup(self) -> GuestMemfd:
        """A second fd for the same file (kernel vm_mem_add's dup): each memslot owns and closes its
        own fd, so the caller may close theirs at any time. The copy has no mapping until mmap()."""
        try:
            fd = os.dup(self.fd)  # Python makes it O_CLOEXEC, like the original
        except OSError as e:
            raise self.error("dup", e.errno or 0) from None
        return GuestMemfd(fd, self.size, self.flags)

    def _fallocate(self, mode: int, offset: int, length: int) -> None:
        try:
            syscalls.fallocate(self.fd, mode, offset, length)
        except OSError as e:
            names = [n for bit, n in ((1, "KEEP_SIZE"), (2, "PUNCH_HOLE")) if mode & bit] or ["0"]
            raise self.error(
                "fallocate", e.errno or 0, f"mode={'|'.join(names)}, offset={offset:#x}, len={length:#x}"
            ) from None

    def allocate(self, offset: int, length: int) -> None:
        """Allocate backing pages (fallocate KEEP_SIZE): what a private fault would do."""
        self._fallocate(syscalls.FALLOC_FL_KEEP_SIZE, offset, length)

    def punch_hole(self, offset: int, length: int) -> None:
        """Discard backing pages (PUNCH_HOLE|KEEP_SIZE): they read back as zeros."""
        self._fallocate(syscalls.FALLOC_FL_KEEP_SIZE | syscalls.FALLOC_FL_PUNCH_HOLE, offset, length)

    def mmap(self) -> mmap.mmap:
        """Map the whole file shared (needs GUEST_MEMFD_FLAG_MMAP); the mapping is kept and reused."""
        if self.map is None:
            try:
                self.map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as e:
                raise self.error("mmap", e.errno or 0, f"len={self.size:#x}, MAP_SHARED") from None
        return self.map

    def allocated_bytes(self) -> int | None:
        """Bytes of pages faulted in or written (mincore on our mapping: fallocate'd pages that were
        never touched are not up to date and do not count); None when the file cannot be mapped."""
        if self.map is None:
            return None
        return syscalls.resident_bytes(syscalls.address_of(self.map), self.size)

    def close(self) -> None:
        """Unmap (unless a view still holds the mapping) and close the fd."""
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # still viewed (a region's memoryview): unmapped when that dies
                pass
            self.map = None
        super().close()
