"""The guest->host call ABI (ucall), shared by every guest in guest/ (see guest/include/vmm.h).

The guest builds a ``struct ucall`` in memory it maps 1:1 (usually on its stack) and writes the
block's physical address with a 32-bit OUT to UCALL_PORT. The host reads the block straight from
guest memory: one exit per call and no extra ioctl. Layout, all little-endian u64:

    cmd, args[0..5]     cmd: SYNC 1, ABORT 2 (failed assert), PRINT 3, DONE 4 (kernel ucall numbers)

    SYNC   args: stage and up to five values, returned to the host test
    PRINT  args[0] = address of the text, args[1] = its length
    ABORT  args[0] = address of the NUL-terminated source file name, args[1] = line,
           args[2] = address of the NUL-terminated expression, args[3] = left value, args[4] = right
    DONE   no args: the guest passed
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import NamedTuple

from .layout import UCALL_SIZE

_UCALL = struct.Struct("<7Q")


class UcallCmd(IntEnum):
    """ucall commands (the numbers of the kernel selftests' enum ucall)."""

    SYNC = 1
    ABORT = 2
    PRINT = 3
    DONE = 4


class Ucall(NamedTuple):
    """One decoded guest->host call (a tuple: cheap to build once per exit)."""

    cmd: int
    args: tuple[int, ...]
    vcpu_id: int = 0

    @property
    def stage(self) -> int:
        """For SYNC: the first argument, by convention the stage number."""
        return self.args[0]


_new = tuple.__new__


def decode(block: memoryview | bytes, vcpu_id: int = 0, offset: int = 0) -> Ucall:
    """Decode a ucall block read from guest memory (at ``offset`` in ``block``)."""
    values = _UCALL.unpack_from(block, offset)
    return _new(Ucall, (values[0], values[1:], vcpu_id))
