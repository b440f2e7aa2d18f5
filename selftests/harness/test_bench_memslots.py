"""`vmm bench memslots` as a user runs it, small and with the bare memslot operations only (the way
every KVM can run): the JSON has every point and the slot limit; a --size that does not split into
4 lanes of 2M is one line, exit 2. The full run is the benchmark's (README)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmm import Kvm
from vmm.kvm.caps import private_memory
from vmm.tools.bench.memslots import default_matrix
from vmm.tools.pytest_plugin import require

from helpers import one_line_error, run_vmm

pytestmark = pytest.mark.host_only


def test_bench_memslots_small_run(kvm: Kvm, tmp_path: Path) -> None:
    """A 16 MiB run, one round trip per point: every point of the default matrix, with figures that
    add up."""
    out = tmp_path / "memslots.json"
    args = ("--size", "16M", "--rounds", "1", "--repeats", "1", "--way", "memslot-ops", "--json", str(out))
    proc = run_vmm("bench", "memslots", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "slot limit: KVM_CAP_NR_MEMSLOTS" in proc.stdout and "memslot-ops" in proc.stdout
    r = json.loads(out.read_text())
    assert r["complete"] and r["ways"] == ["memslot-ops"]
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


def test_bench_memslots_private_ways_need_private_memory(kvm: Kvm) -> None:
    """Without KVM_X86_SW_PROTECTED_VM the private-memory ways are left out, saying so; with nothing
    left to measure the run is one line, exit 2 (not a traceback after minutes)."""
    require(not private_memory(kvm), "a host without KVM_X86_SW_PROTECTED_VM (nested runs every way)")
    line = one_line_error(run_vmm("bench", "memslots", "--size", "16M", "--way", "attributes", "--way", "memslots"))
    assert "nothing to measure" in line
