"""`vmm bench exits` runs every row on the real KVM (the figures are the benchmark's business; the
test checks that each row ran the exits it claims and that the output has what the README says)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmm.kvm.system import Kvm
from vmm.tools.bench import exits as bench_exits

from helpers import run_vmm

pytestmark = pytest.mark.host_only  # a minute of TCG inside, and the figures say nothing nested


def test_every_row_runs_its_exits(kvm: Kvm, tmp_path: Path) -> None:
    """300 SYNCs per row, one round: the floor, C and vmm rows in both modes each handled 301 exits
    (the C loop checks every SYNC's counter, vmm's loop the same), and the table shows them."""
    out = tmp_path / "exits.json"
    proc = run_vmm("bench", "exits", "--exits", "300", "--repeats", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    rows = [*bench_exits.C_ROWS, *bench_exits.PY_ROWS]
    assert sorted(r["impl"] for r in result["runs"]) == sorted(rows)
    assert all(r["exits"] == 301 and r["us_per_exit"] > 0 for r in result["runs"])
    assert set(result["us_per_exit"]) == set(rows)
    for label in bench_exits.LABELS.values():
        assert label in proc.stdout
    assert "ratio vmm/C" in proc.stdout and "floor" in proc.stdout
