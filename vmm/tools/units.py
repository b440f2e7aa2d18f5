"""Sizes as users write them ("4M", "0x10000") and as reports print them ("1.5 MiB")."""

from __future__ import annotations

import re

from vmm.errors import VmmError

_SIZE = re.compile(r"^(0x[0-9a-f]+|\d+)\s*([kmgt]?)(i?b)?$", re.I)
_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}


def parse_size(text: str) -> int:
    """'4M', '2MiB', '65536', '0x10000' -> bytes; page alignment is checked by the caller."""
    m = _SIZE.match(text.strip())
    if not m:
        raise VmmError(f"bad size {text!r}: use a number with an optional K/M/G/T suffix")
    return int(m.group(1), 0) << _SHIFT[m.group(2).lower()]


def human_size(n: float | None) -> str:
    """Bytes for a report: '512 B', '4.0 KiB', '1.5 GiB'; 'n/a' for None (not measurable)."""
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
