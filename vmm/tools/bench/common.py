"""What every benchmark shares: the host it ran on, medians of interleaved runs, and a JSON file
that survives a nested kernel dying right after it is written."""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path


def host_info() -> dict:
    """What the numbers were measured on."""
    u = platform.uname()
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {
        "system": u.system,
        "node": u.node,
        "kernel": u.release,
        "kernel_version": u.version,
        "machine": u.machine,
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg": list(os.getloadavg()),
    }


def interleaved(repeats: int, impls: Sequence[str], run: Callable[[str], dict]) -> list[dict]:
    """``repeats`` rounds of one run per implementation, the order reversed every other round, so
    drift from other load hits each side alike; each result gets ``impl`` and ``round``."""
    runs = []
    for r in range(repeats):
        for impl in impls if r % 2 == 0 else list(reversed(impls)):
            res = run(impl)
            res.update(impl=impl, round=r)
            runs.append(res)
    return runs


def median(runs: Sequence[dict], impl: str, key: str) -> float:
    """The median of ``key`` over the runs of ``impl``."""
    return statistics.median(x[key] for x in runs if x["impl"] == impl)


def write_json(path: str | os.PathLike[str], result: dict) -> None:
    """Write ``result`` and fsync it: a nested kernel can die before its final sync."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(json.dumps(result, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
