"""vmm as users get it: a test file written anywhere runs under plain pytest with vmm's fixtures
(the pytest11 plugin), and the wheel builds and installs into a fresh venv where `vmm doctor` and
the plugin work."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from vmm import __version__

# vmm's own behaviour, the same in any kernel: the nested runs leave it to the host
pytestmark = pytest.mark.host_only

ROOT = Path(__file__).resolve().parents[2]  # the checkout

# What a user writes: fixtures and gates from the plugin, the public API only.
OUT_OF_TREE_TEST = """
from vmm import Machine, UcallCmd, load_guest
from vmm.tools.pytest_plugin import require


def test_hello(machine: Machine) -> None:
    machine.load(load_guest("hello"))
    [result] = machine.run_all(timeout=10)
    assert result.cmd == UcallCmd.DONE


def test_gate(kvm) -> None:
    require(kvm.api_version() == 12, "KVM API 12")
"""


def run_pytest(python: str, directory: Path) -> subprocess.CompletedProcess[str]:
    """Plain `python -m pytest` in ``directory``, far from the checkout and its conftest."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    return subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(directory)],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_out_of_tree_test_uses_the_plugin(tmp_path: Path) -> None:
    """A 10-line test file in an empty directory gets the kvm and machine fixtures and boots a guest."""
    (tmp_path / "test_mine.py").write_text(OUT_OF_TREE_TEST)
    proc = run_pytest(sys.executable, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "2 passed" in proc.stdout


@pytest.mark.slow
@pytest.mark.no_kvm
def test_wheel_installs_into_a_fresh_venv(tmp_path: Path) -> None:
    """python -m build makes a vmm-gmem wheel carrying the guests; a fresh venv with it (and pytest)
    runs `vmm doctor --json` and the out-of-tree test."""
    pytest.importorskip("build", reason="needs the `build` package (pip install build)")
    dist = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    [wheel] = dist.glob("*.whl")
    assert wheel.name.startswith(f"vmm_gmem-{__version__}-"), wheel.name
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    pip = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel), "pytest"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pip.returncode == 0, pip.stderr[-2000:]
    listing = subprocess.run(
        [python, "-c", "import vmm.guest.image as i; print(sorted(i.bundled()))"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert "'hello'" in listing.stdout, listing.stderr
    doctor = subprocess.run(
        [str(env_dir / "bin" / "vmm"), "doctor", "--json"], capture_output=True, text=True, cwd=tmp_path
    )
    if os.path.exists("/dev/kvm"):
        assert doctor.returncode == 0 and '"kvm_api_version": 12' in doctor.stdout, doctor.stderr
    tests = tmp_path / "mine"
    tests.mkdir()
    (tests / "test_mine.py").write_text(OUT_OF_TREE_TEST)
    proc = run_pytest(python, tests)
    if os.path.exists("/dev/kvm") and shutil.which("as"):
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
