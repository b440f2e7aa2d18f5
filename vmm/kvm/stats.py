"""A KVM binary stats fd (KVM_GET_STATS_FD on a VM or vCPU fd): header, id and descriptors decoded
once when it is opened, every value read with one pread of the data block per ``read()``.

Layout (api.rst "KVM_GET_STATS_FD"): struct kvm_stats_header at offset 0, the id string
(name_size bytes) at id_offset, num_desc descriptors of sizeof(kvm_stats_desc) + name_size bytes
at desc_offset, and at data_offset the values, ``size`` u64s per stat at its ``offset``.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from vmm.errors import VmmError

from . import uapi
from .fd import KvmFd
from .uapi import StatsBase, StatsType, StatsUnit, enum_name

_DESC_SIZE = ctypes.sizeof(uapi.kvm_stats_desc)


@dataclass(frozen=True)
class StatDesc:
    """One stat as its kvm_stats_desc describes it; ``offset`` is in bytes into the data block."""

    name: str
    flags: int
    exponent: int
    size: int  # u64 values: 1 for a counter, the bucket count for a histogram
    offset: int
    bucket_size: int

    @property
    def type(self) -> int:
        """KVM_STATS_TYPE_* bits (a StatsType value when the kernel uses a known one)."""
        return self.flags & uapi.KVM_STATS_TYPE_MASK

    @property
    def unit(self) -> int:
        """KVM_STATS_UNIT_* bits."""
        return self.flags & uapi.KVM_STATS_UNIT_MASK

    @property
    def base(self) -> int:
        """KVM_STATS_BASE_* bits: the base of ``exponent`` (10 or 2)."""
        return self.flags & uapi.KVM_STATS_BASE_MASK

    def __str__(self) -> str:
        unit = enum_name(StatsUnit, self.unit).lower()
        scale = f" x{10 if self.base == StatsBase.POW10 else 2}^{self.exponent}" if self.exponent else ""
        return f"{self.name} ({enum_name(StatsType, self.type).lower()}, {unit}{scale}, {self.size} u64)"


class Snapshot:
    """The values of every stat at one ``Stats.read()``: ``snap["pages_2m"]`` for a counter,
    ``snap.histogram(name)`` for a histogram's buckets, ``new - old`` for the counters' changes."""

    def __init__(self, stats: Stats, data: bytes) -> None:
        self.stats = stats
        self._u64 = struct.unpack(f"<{len(data) // 8}Q", data)

    def histogram(self, name: str) -> tuple[int, ...]:
        """Every u64 of ``name`` (a histogram's buckets; one value for a counter)."""
        d = self.stats.desc(name)
        return self._u64[d.offset // 8 : d.offset // 8 + d.size]

    def __getitem__(self, name: str) -> int:
        d = self.stats.desc(name)
        if d.size != 1:
            raise VmmError(f"{self.stats.id}: {name} is a {d.size}-bucket histogram: use histogram()")
        return self._u64[d.offset // 8]

    def counters(self) -> dict[str, int]:
        """Every single-valued stat by name."""
        return {d.name: self._u64[d.offset // 8] for d in self.stats.descs if d.size == 1}

    def __sub__(self, old: Snapshot) -> dict[str, int]:
        """Counter changes since ``old`` (a snapshot of the same fd), zeros left out."""
        before = old.counters()
        return {k: v - before[k] for k, v in self.counters().items() if v != before[k]}


class Stats(KvmFd):
    """One binary stats fd. The descriptors never change for the fd's life, so they are decoded here
    once; ``read()`` takes one pread of the data block and returns a Snapshot."""

    kind = "stats"

    def __init__(self, fd: int, owner: str) -> None:
        super().__init__(fd)
        self.owner = owner  # "VM" or "vCPU 0", for messages
        try:
            self.header = uapi.kvm_stats_header.from_buffer_copy(self._pread(ctypes.sizeof(uapi.kvm_stats_header), 0))
            h = self.header
            raw_id = self._pread(h.name_size, h.id_offset)
            self.id = raw_id.split(b"\0", 1)[0].decode(errors="replace")
            step = _DESC_SIZE + h.name_size
            raw = self._pread(step * h.num_desc, h.desc_offset)
        except BaseException:
            self.close()
            raise
        self.descs: list[StatDesc] = []
        for i in range(h.num_desc):
            d = uapi.kvm_stats_desc.from_buffer_copy(raw, i * step)
            name = raw[i * step + _DESC_SIZE : (i + 1) * step].split(b"\0", 1)[0].decode(errors="replace")
            self.descs.append(StatDesc(name, d.flags, d.exponent, d.size, d.offset, d.bucket_size))
        self._by_name = {d.name: d for d in self.descs}
        #: bytes of the data block: up to the end of the furthest stat (the kernel's own test sums sizes)
        self.data_size = max((d.offset + 8 * d.size for d in self.descs), default=0)

    def _pread(self, size: int, offset: int) -> bytes:
        """pread exactly ``size`` bytes at ``offset``; a short read is an error naming the fd."""
        if self.fd < 0:
            raise ValueError(f"read of closed {self.kind} fd")
        try:
            data = os.pread(self.fd, size, offset)
        except OSError as e:
            raise self.error("pread", e.errno or 0, f"{self.owner} stats, {size} bytes at {offset}") from None
        if len(data) != size:
            raise VmmError(f"{self.owner} stats fd: read {len(data)} of {size} bytes at offset {offset}")
        return data

    def desc(self, name: str) -> StatDesc:
        """The descriptor of ``name``; VmmError naming the fd's id when this kernel has no such stat."""
        try:
            return self._by_name[name]
        except KeyError:
            raise VmmError(f"{self.id}: no stat named {name!r} ({len(self.descs)} stats)") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[StatDesc]:
        return iter(self.descs)

    def read(self) -> Snapshot:
        """Every value now: one pread of the data block."""
        return Snapshot(self, self._pread(self.data_size, self.header.data_offset))

    def __repr__(self) -> str:
        return f"<Stats {self.id!r} fd={self.fd} {len(self.descs)} stats>"
