"""The demand-paging guest (guest/demand_paging.S) from the host side: its parameter block, and the
page pattern it checks (the u64s at offsets 0 and 0xff8 of the page at GPA a hold a ^ seed)."""

from __future__ import annotations

import os
import struct
from array import array

from vmm.memory.regions import PAGE_SIZE, GuestMemory

from .layout import DATA_GPA

GUEST = "demand_paging"
PAGED_GPA = DATA_GPA  # where the demand-paged memslot goes (4 GiB: above slot 0)
SWEEP, COMMANDS, OUTS, CALL = 0, 1, 2, 3
PARAMS_SIZE = 64 + 16 * 256  # header, then one {gpa, npages} command per vCPU
OUTS_PORT = 0x2000
_LAST = PAGE_SIZE - 8


def pattern(gpa: int, size: int, seed: int, fill: bytes | None = None) -> bytes:
    """Page contents for [gpa, gpa+size): random bytes (or ``fill`` repeated), with the two u64s per
    page the guest checks. No per-byte Python: one array per checked column."""
    data = bytearray(os.urandom(size) if fill is None else (fill * (size // len(fill) + 1))[:size])
    words = memoryview(data).cast("Q")
    step = PAGE_SIZE // 8
    first = array("Q", ((a ^ seed) for a in range(gpa, gpa + size, PAGE_SIZE)))
    last = array("Q", ((a + _LAST) ^ seed for a in range(gpa, gpa + size, PAGE_SIZE)))
    words[0::step] = memoryview(first).cast("B").cast("Q")
    words[step - 1 :: step] = memoryview(last).cast("B").cast("Q")
    words.release()
    return bytes(data)


def params_gpa(memory: GuestMemory) -> int:
    """Where the parameter block goes: the last 8 KiB of slot 0 (above everything Machine.load places)."""
    return memory.region_at(0).end - 2 * PAGE_SIZE


def write_params(
    memory: GuestMemory,
    at: int,
    base: int,
    per_vcpu: int,
    seed: int,
    mode: int = SWEEP,
    write: bool = False,
    check: bool = True,
    overlap: bool = False,
) -> None:
    """The guest's parameter block at ``at`` (shared memory in slot 0; pass ``at`` as the arg);
    ``check`` False touches pages without checking the pattern (any page source); ``overlap``
    makes every vCPU touch the first vCPU's region."""
    memory.write(at, struct.pack("<7Q", base, per_vcpu, seed, mode, int(write), int(check), int(overlap)))
    memory.write(at + 64, bytes(16 * 256))


def command(memory: GuestMemory, at: int, vcpu: int, gpa: int, npages: int) -> None:
    """COMMANDS mode: what vCPU ``vcpu`` touches after its next SYNC(2) (npages 0: DONE)."""
    memory.write(at + 64 + 16 * vcpu, struct.pack("<2Q", gpa, npages))
