"""Inside the nested kernels every skip must be on that kernel's list (selftests/nested-skips/):
an inner pytest run with VMM_NESTED=1 and a list for this host's kernel series shows that an
expected skip stays a skip and any other skip fails."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from vmm.kvm.caps import PRIVATE_MEM_REASON

pytestmark = pytest.mark.no_kvm

ROOT = Path(__file__).resolve().parents[2]  # the checkout
SERIES = ".".join(platform.release().split(".")[:2])
INNER = """
import pytest

def test_listed():
    pytest.skip("needs FEATURE_A")

def test_unlisted():
    pytest.skip("needs FEATURE_B")
"""


def inner_run(tmp_path: Path, listing: str) -> str:
    """Run INNER as if nested, with ``listing`` as this kernel series' skip list; pytest's -rA lines."""
    tests = ROOT / "selftests" / "harness" / f"_inner_skips_{os.getpid()}_test.py"
    skips = tmp_path / "skips"
    skips.mkdir()
    (skips / f"{SERIES}.txt").write_text(listing)
    tests.write_text(INNER)
    try:
        env = dict(os.environ, VMM_NESTED="1", VMM_NESTED_SKIPS_DIR=str(skips))
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(tests)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        tests.unlink()
    return proc.stdout


def test_unlisted_skip_fails_nested(tmp_path: Path) -> None:
    """A listed (test, reason) pair stays a skip; a skip nobody listed becomes a failure naming the list."""
    out = inner_run(tmp_path, "selftests/harness/_inner_skips_*::test_listed | FEATURE_A    # why\n")
    assert "1 failed" in out and "1 skipped" in out, out
    assert "unexpected skip in the nested" in out and "FEATURE_B" in out


def test_reason_must_match_too(tmp_path: Path) -> None:
    """The test id alone is not enough: a listed test skipping for another reason fails."""
    out = inner_run(tmp_path, f"selftests/harness/_inner_skips_*::* | {PRIVATE_MEM_REASON}\n")
    assert "2 failed" in out, out
