"""`vmm bench memslots` as a user runs it, small: on a host without private memory only the bare
memslot operations run (the other ways are left out, saying why); the JSON has every point and the
slot limit; a --size that does not split into 4 lanes of 2M is one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmm import Kvm
from vmm.kvm.caps import private_memory
from vmm.tools.bench.memslots import WAYS, default_matrix
from vmm.tools.pytest_plugin import require

from helpers import one_line_error, run_vmm

pytestmark = pytest.mark.host_only


def test_bench_memslots_small_run(kvm: Kvm, tmp_path: Path) -> None:
    """A 16 MiB run, one round trip per point: every point of the default matrix, for each way this
    host can run, with figures that add up."""
    require(not private_memory(kvm), "a host without private memory (nested, the full run is the benchmark's)")
    out = tmp_path / "memslots.json"
    proc = run_vmm("bench", "memslots", "--size", "16M", "--rounds", "1", "--repeats", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "left out" in proc.stderr and "slot limit: KVM_CAP_NR_MEMSLOTS" in proc.stdout
    r = json.loads(out.read_text())
    assert r["complete"] and r["ways"] == ["memslot-ops"] and set(WAYS) > set(r["ways"])
    assert len(r["points"]) == 2 * len(default_matrix(r["n_vcpus"]))
    for p in r["points"]:
        x = p["memslot-ops"]
        assert x["us_per_conversion"] > 0 and x["conversions_per_s"] > 0
        assert (x["stall"] is None) == (p["vcpus"] == 0)
        assert all(run["conversions"] == 2 * p["threads"] for run in x["runs"])
    assert r["slot_limit"]["slot_past_limit_refused"] == "EINVAL"


def test_bench_memslots_bad_size(kvm: Kvm) -> None:
    """--size must split into 4 memslots of whole 2M units."""
    line = one_line_error(run_vmm("bench", "memslots", "--size", "6M"))
    assert "multiple of 4 x 2M" in line
