"""Smoke tests that run inside the nested kernel (selected by test_nested_runner's e2e tests).

On the host they skip: they check what the nested runner promises its guest, not the host.
"""

from __future__ import annotations

import fcntl
import os

import pytest

KVM_CREATE_VM = 0xAE01
KVM_X86_SW_PROTECTED_VM = 1

pytestmark = pytest.mark.skipif(os.environ.get("VMM_NESTED") != "1", reason="only inside the nested kernel")


def test_guest_environment() -> None:
    """The runner's init script exported the nested-run variables and mounted /tmp writable."""
    assert os.environ["VMM_REQUIRE_PRIVATE_MEM"] == "1"
    assert os.environ["PYTHONDONTWRITEBYTECODE"] == "1"
    with open("/tmp/vmm-smoke", "w") as f:
        f.write("ok")


def test_sw_protected_vm() -> None:
    """/dev/kvm exists inside and KVM_CREATE_VM(KVM_X86_SW_PROTECTED_VM) succeeds."""
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        vm = fcntl.ioctl(fd, KVM_CREATE_VM, KVM_X86_SW_PROTECTED_VM)
        assert vm >= 0
        os.close(vm)
    finally:
        os.close(fd)


def test_anchor_vm_is_held() -> None:
    """The runner's anchor process holds two VMs open (so KVM's static keys never flip mid-run)."""
    holders = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        if int(pid) != os.getpid() and links.count("anon_inode:kvm-vm") >= 2:
            holders.append(pid)
    assert holders, "no process holds the anchor VMs"


@pytest.mark.skipif(os.environ.get("VMM_SMOKE_FAIL") != "1", reason="set VMM_SMOKE_FAIL=1 to see a failure")
def test_deliberate_failure() -> None:
    """Fails on purpose when VMM_SMOKE_FAIL=1, so the runner's tests-failed verdict can be checked."""
    pytest.fail("deliberate failure (VMM_SMOKE_FAIL=1)")
