"""`vmm trace`: a KVM-aware tracer (python-ptrace) that shows what any VMM does with guest memory.

Nothing here imports python-ptrace (the ``trace`` extra): `vmm` must start without it."""

from __future__ import annotations

import importlib.metadata

CATEGORIES = ("kvm", "memory", "exits")  # the event kinds --only selects


def requirements() -> dict:
    """What `vmm trace` needs, for `vmm doctor`: python-ptrace's version (None when missing) and
    kernel.yama.ptrace_scope (None without Yama: 1 lets -p trace only descendants unless root)."""
    try:
        version: str | None = importlib.metadata.version("python-ptrace")
    except importlib.metadata.PackageNotFoundError:
        version = None
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope: int | None = int(f.read())
    except (OSError, ValueError):
        scope = None
    return {"python_ptrace": version, "ptrace_scope": scope}
