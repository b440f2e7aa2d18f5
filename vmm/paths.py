"""Where vmm finds and keeps files: the checkout it runs from and the per-user cache."""

from __future__ import annotations

import os
from pathlib import Path

#: The directory holding vmm/, guest/, selftests/ and bench/ when running from a checkout.
CHECKOUT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """The per-user cache: $VMM_CACHE_DIR, else $XDG_CACHE_HOME/vmm, else ~/.cache/vmm (built test
    kernels, kernel headers, C selftests, user guests)."""
    if os.environ.get("VMM_CACHE_DIR"):
        return Path(os.environ["VMM_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vmm"
