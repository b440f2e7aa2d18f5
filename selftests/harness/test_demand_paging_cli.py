"""`vmm boot GUEST --demand-paging SOURCE [--fetch 4k|2m] [--prefetch N]` and `vmm doctor`'s demand
paging line, as a user runs them (real subprocesses): every bad option value is one line with exit
2; nested, a boot pages the file in and reports faults, fetches, bytes and time."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from vmm import Kvm
from vmm.kvm.caps import private_memory
from vmm.tools.pytest_plugin import require_private_mem

from helpers import one_line_error
from helpers import run_vmm as vmm


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A 3 MiB page source (not a multiple of 2M: the paged size rounds up)."""
    path = tmp_path / "pages.bin"
    path.write_bytes(os.urandom(3 << 20))
    return path


@pytest.mark.host_only  # argument checks: nothing a nested kernel answers differently (12 boots: 2 min under TCG)
def test_bad_demand_paging_options(tmp_path: Path, source: Path) -> None:
    """Each option's bad values: one line naming the option, exit 2, whatever the host."""
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    cases = [
        (("--demand-paging", str(tmp_path / "missing")), "not found"),
        (("--demand-paging", str(tmp_path)), "not a regular file"),
        (("--demand-paging", str(empty)), "empty"),
        (("--demand-paging", str(source), "--fetch", "8k"), "'--fetch'"),
        (("--demand-paging", str(source), "--fetch", ""), "'--fetch'"),
        (("--demand-paging", str(source), "--prefetch", "-1"), "'--prefetch'"),
        (("--demand-paging", str(source), "--prefetch", "many"), "'--prefetch'"),
        (("--demand-paging", str(source), "--vm-type", "default"), "needs --vm-type sw_protected"),
        (("--fetch", "2m"), "--fetch needs --demand-paging"),
        (("--prefetch", "2"), "--prefetch needs --demand-paging"),
        (("--demand-paging",), "requires an argument"),
    ]
    for args, expected in cases:
        line = one_line_error(vmm("boot", "demand_paging", *args))
        assert expected in line, f"{args}: {line}"
    line = one_line_error(vmm("boot", "private_demo", "--demand-paging", str(source)))
    assert "private-memory guest private_demo" in line, line


@pytest.mark.host_only  # nested kernels have SW_PROTECTED: test_boot_demand_paging checks doctor there
def test_demand_paging_follows_sw_protected(kvm: Kvm, source: Path) -> None:
    """doctor's demand-paging line follows KVM_X86_SW_PROTECTED_VM; without it, boot refuses in one
    line naming the capability (with it, test_boot_demand_paging below boots)."""
    report = json.loads(vmm("doctor", "--json").stdout)["demand_paging"]
    assert report["attributes"] is private_memory(kvm)
    if private_memory(kvm):
        assert "memory attributes (`vmm boot --demand-paging`)" in vmm("doctor").stdout
        return
    line = one_line_error(vmm("boot", "demand_paging", "--demand-paging", str(source)))
    assert "KVM_X86_SW_PROTECTED_VM" in line and "vmm nested" in line, line
    assert "no memory attributes" in vmm("doctor").stdout


@pytest.mark.private_mem
# one variant: a boot is ~20 s under TCG; 4K page-ins are the library tests' (test_paging_attributes)
@pytest.mark.parametrize("fetch,prefetch", [("2m", "1")])
def test_boot_demand_paging(kvm: Kvm, source: Path, fetch: str, prefetch: str) -> None:
    """The demand_paging guest touches every page paged from the 3 MiB file: 3 MiB in 768 4K
    fetches, or 4 MiB (rounded up to the unit; the rest reads as zeros) in both 2M units from one or
    two faults with --prefetch 1."""
    require_private_mem(kvm)
    proc = vmm(
        "boot",
        "demand_paging",
        "--vcpus",
        "2",
        "--demand-paging",
        str(source),
        "--fetch",
        fetch,
        "--prefetch",
        prefetch,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passed (GUEST_DONE)" in proc.stdout, proc.stdout
    size = "3.0 MiB" if fetch == "4k" else "4.0 MiB"
    m = re.search(rf"paging +.*: (\d+) faults \((\d+) stale\), (\d+) fetches, {size} in [\d.]+ ms", proc.stdout)
    assert m, proc.stdout
    faults, fetches = int(m[1]), int(m[3])
    # 2M with --prefetch 1: one fetch of both units, or two when vCPU 1 faults first
    assert fetches in ((768,) if fetch == "4k" else (1, 2)), proc.stdout
    assert faults >= fetches and f"{size} present" in proc.stdout, proc.stdout
    assert "memory attributes (`vmm boot --demand-paging`)" in vmm("doctor").stdout
