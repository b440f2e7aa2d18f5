"""The VMM's own map of memory attributes: KVM has no ioctl to read them back.

Stored as ranges, not pages: two parallel arrays of boundaries and values, where [starts[i],
starts[i+1]) has values[i] and neighbours always differ. A 64 GiB guest with 10,000 alternating
ranges costs 16 bytes a range; lookups are a bisect (O(log n)); an update is a bisect plus one
slice replacement (a C memmove of the tail, no per-page Python work). An update rewrites both
arrays in several steps, so set(), get(), uniform() and find() hold ``lock``: a vCPU thread reading
the map (a host check of guest memory) while another converts must not see them half-updated."""

from __future__ import annotations

import threading
from array import array
from bisect import bisect_right
from collections.abc import Iterator

GPA_LIMIT = 1 << 64


class AttributeMap:
    """Attributes of every GPA; everything starts at 0 (shared)."""

    def __init__(self) -> None:
        self.starts = array("Q", [0])
        self.values = array("Q", [0])
        self.lock = threading.Lock()

    def __len__(self) -> int:
        """Number of maximal ranges (including the trailing one up to 2**64)."""
        return len(self.starts)

    def get(self, gpa: int) -> int:
        """Attributes at ``gpa``."""
        with self.lock:
            return self.values[bisect_right(self.starts, gpa) - 1]

    def set(self, start: int, end: int, value: int) -> None:
        """Give [start, end) the attributes ``value``."""
        if not 0 <= start < end <= GPA_LIMIT:
            raise ValueError(f"bad range [{start:#x}, {end:#x})")
        with self.lock:
            self._set(start, end, value)

    def _set(self, start: int, end: int, value: int) -> None:
        starts, values = self.starts, self.values
        lo = bisect_right(starts, start) - 1  # range holding start
        hi = bisect_right(starts, end - 1) - 1  # range holding end - 1
        after = values[hi] if end < GPA_LIMIT else None  # what continues at `end`
        new_starts, new_values = [], []
        if starts[lo] < start:
            new_starts.append(starts[lo])
            new_values.append(values[lo])
        new_starts.append(start)
        new_values.append(value)
        if after is not None and (hi + 1 == len(starts) or starts[hi + 1] != end):
            new_starts.append(end)
            new_values.append(after)
        starts[lo : hi + 1] = array("Q", new_starts)
        values[lo : hi + 1] = array("Q", new_values)
        for i in range(lo + len(new_starts), lo - 1, -1):  # the boundary after the new ones, then theirs
            self._merge(i)

    def _merge(self, i: int) -> None:
        """Drop boundary ``i`` when ranges i-1 and i have the same value."""
        if 0 < i < len(self.starts) and self.values[i - 1] == self.values[i]:
            del self.starts[i], self.values[i]

    def ranges(self, start: int = 0, end: int = GPA_LIMIT) -> Iterator[tuple[int, int, int]]:
        """(start, end, value) of the ranges overlapping [start, end), clipped to it (a generator:
        no lock, so call it where no other thread converts, e.g. for an error message)."""
        i = bisect_right(self.starts, start) - 1
        n = len(self.starts)
        while i < n and self.starts[i] < end:
            r_end = self.starts[i + 1] if i + 1 < n else GPA_LIMIT
            yield max(self.starts[i], start), min(r_end, end), self.values[i]
            i += 1

    def uniform(self, start: int, end: int) -> int | None:
        """The single value of [start, end), or None when the range is mixed."""
        with self.lock:
            i = bisect_right(self.starts, start) - 1
            if i + 1 < len(self.starts) and self.starts[i + 1] < end:
                return None
            return self.values[i]

    def find(self, start: int, end: int, mask: int) -> tuple[int, int] | None:
        """The first (whole, unclipped) range overlapping [start, end) whose value has a bit of
        ``mask``; None when there is none (one bisect, then a step per range: no per-page work)."""
        with self.lock:
            starts, values = self.starts, self.values
            i, n = bisect_right(starts, start) - 1, len(starts)
            while i < n and starts[i] < end:
                if values[i] & mask:
                    return starts[i], starts[i + 1] if i + 1 < n else GPA_LIMIT
                i += 1
            return None

    def nbytes(self) -> int:
        """Memory the map holds (its two arrays)."""
        return self.starts.itemsize * len(self.starts) * 2
