"""The `vmm` command as a user runs it (a real subprocess): doctor, boot and its verdict exit
codes, and one-line errors without tracebacks for user mistakes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmm import Cap, GmemFlag, Kvm
from vmm.tools.pytest_plugin import require, require_gmem_flags, require_private_mem

ROOT = Path(__file__).resolve().parents[2]  # the checkout


def vmm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmm", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def one_line_error(proc: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """Assert the process failed with ``code`` and a single 'vmm: ...' line, no traceback."""
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmm: "), proc.stderr
    return lines[0]


def test_doctor_json(kvm: Kvm) -> None:
    """doctor --json reports the API version, per-fd capabilities and the selftest groups."""
    proc = vmm("doctor", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["kvm_api_version"] == kvm.api_version() == 12
    caps = report["capabilities"]["KVM_CAP_GUEST_MEMFD"]
    assert "/dev/kvm" in caps and "VM(DEFAULT)" in caps
    groups = {g["group"]: g for g in report["selftest_groups"]}
    private = groups["private memory"]
    assert private["runs"] == report["private_memory"]["available"]
    assert private["runs"] or "KVM_X86_SW_PROTECTED_VM" in private["needs"]


def test_doctor_text() -> None:
    """doctor's text report names the capabilities and says where private memory runs."""
    proc = vmm("doctor")
    assert proc.returncode == 0, proc.stderr
    assert "KVM_CAP_GUEST_MEMFD" in proc.stdout and "selftest groups" in proc.stdout
    assert "private memory" in proc.stdout and "nested" in proc.stdout


def test_boot_default_guest() -> None:
    """`vmm boot` boots hello, streams its output, prints a summary and exits 0."""
    proc = vmm("boot")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "guest: hello from a long-mode guest" in out and "passed (GUEST_DONE)" in out
    assert "exits: IO" in out and "memory" in out


@pytest.mark.parametrize("backing", ["shared", "guest_memfd", "guest_memfd-only"])
def test_boot_backings(backing: str, kvm: Kvm) -> None:
    """Each backing boots hello on a default VM (guest_memfd needs KVM_CAP_GUEST_MEMFD there, as on
    6.18; guest_memfd-only needs GUEST_MEMFD_FLAG_MMAP|INIT_SHARED)."""
    with kvm.create_vm() as vm:
        if backing != "shared":
            require(vm.check_extension(Cap.GUEST_MEMFD) > 0, "KVM_CAP_GUEST_MEMFD on a default VM")
        if backing == "guest_memfd-only":
            require_gmem_flags(vm, GmemFlag.MMAP | GmemFlag.INIT_SHARED)
    proc = vmm("boot", "hello", "--backing", backing, "--mem", "8M")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"8.0 MiB {backing}" in proc.stdout


def test_boot_real_mode_from_source_path() -> None:
    """A .S path is assembled and booted in the mode its header asks for."""
    proc = vmm("boot", str(ROOT / "guest" / "real_mode.S"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "real mode" in proc.stdout and "hello from real mode" in proc.stdout


def test_boot_verdicts() -> None:
    """A failed guest assert exits 1 showing file:line and values; a spinning guest times out with 4;
    a triple fault stops with 3."""
    failed = vmm("boot", "assert_fail")
    assert failed.returncode == 1 and "assert_fail.S:6" in failed.stdout and "0x29 != 0x2a" in failed.stdout
    timeout = vmm("boot", "exits", "--arg", "6", "--timeout", "0.5")
    assert timeout.returncode == 4 and "TIMEOUT" in timeout.stdout
    shutdown = vmm("boot", "exits", "--arg", "2")
    assert shutdown.returncode == 3 and "KVM_EXIT_SHUTDOWN" in shutdown.stdout


def test_user_errors_are_one_line(tmp_path: Path) -> None:
    """Missing/unreadable/malformed guests and bad sizes: one line on stderr, exit 2."""
    assert "not found" in one_line_error(vmm("boot", str(tmp_path / "missing.S")))
    assert "no bundled guest" in one_line_error(vmm("boot", "no_such_guest"))
    bad = tmp_path / "bad.S"
    bad.write_text("this is not assembly\n")
    assert "bad.S:1" in one_line_error(vmm("boot", str(bad)))
    unreadable = tmp_path / "secret.bin"
    unreadable.write_bytes(b"\xf4")
    unreadable.chmod(0)
    if os.geteuid() != 0:  # root reads anything
        assert "not readable" in one_line_error(vmm("boot", str(unreadable)))
    elf = tmp_path / "guest.elf"
    elf.write_bytes(b"\x7fELF" + bytes(60))
    assert "ELF" in one_line_error(vmm("boot", str(elf)))
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert "empty" in one_line_error(vmm("boot", str(empty)))
    assert "page size" in one_line_error(vmm("boot", "--mem", "5000"))
    assert "larger than this host" in one_line_error(vmm("boot", "--mem", "100T"))
    assert "bad size" in one_line_error(vmm("boot", "--mem", "lots"))


def test_missing_or_forbidden_dev_kvm(tmp_path: Path) -> None:
    """No /dev/kvm, or no permission on it: one line naming the device, exit 2."""
    missing = one_line_error(vmm("boot", env={"VMM_KVM_DEVICE": str(tmp_path / "kvm")}))
    assert "does not exist" in missing
    forbidden = tmp_path / "kvm-forbidden"
    forbidden.write_text("")
    forbidden.chmod(0)
    env = {"VMM_KVM_DEVICE": str(forbidden)}
    if os.geteuid() == 0:  # root ignores file modes unless it gives up CAP_DAC_OVERRIDE
        proc = subprocess.run(
            ["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-m", "vmm", "doctor"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
            env={**os.environ, **env},
        )
    else:
        proc = vmm("doctor", env=env)
    assert "no permission" in one_line_error(proc)


@pytest.mark.private_mem
def test_private_guest_needs_private_memory(kvm: Kvm) -> None:
    """On a host without private memory, booting the private demo says so in one line; with it,
    the demo runs and prints per-step accounting of shared and private bytes."""
    from vmm.tools.doctor import private_memory

    if not private_memory(kvm):
        message = one_line_error(vmm("boot", "private_demo"))
        assert "KVM_X86_SW_PROTECTED_VM" in message and "vmm nested" in message
        require_private_mem(kvm)  # skips (or fails inside the nested runner)
    proc = vmm("boot", "private_demo", "--timeout", "120")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = [line for line in proc.stdout.splitlines() if line.strip().startswith("step ")]
    assert len(steps) == 6 and "private" in steps[1] and "HYPERCALL" in steps[1]
    assert "conversions" in proc.stdout
