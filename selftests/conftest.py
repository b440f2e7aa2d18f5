"""Shared fixtures and up-front requirement checks (the kernel selftests' TEST_REQUIRE)."""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Iterator

import pytest

from vmm import doctor, guest
from vmm.machine import Machine
from vmm.system import Kvm
from vmm.uapi import Cap, GmemFlag
from vmm.vm import Vm

REQUIRE_PRIVATE_MEM = os.environ.get("VMM_REQUIRE_PRIVATE_MEM") == "1"

# --ktap FILE (vmm/ktap.py). A pip-installed vmm loads it through its pytest11 entry point, and
# pluggy refuses to register one module twice, so name it here only when that is not the case.
if not importlib.metadata.entry_points(group="pytest11", name="vmm_ktap"):
    pytest_plugins = ["vmm.ktap"]


@pytest.fixture(scope="session")
def kvm() -> Iterator[Kvm]:
    """/dev/kvm, opened once for the session."""
    with Kvm() as k:
        yield k


@pytest.fixture
def vm(kvm: Kvm) -> Iterator[Vm]:
    """A fresh default VM."""
    with kvm.create_vm() as v:
        yield v


def require(condition: bool, capability: str) -> None:
    """Skip unless the host has ``capability`` (a skip's reason always names it)."""
    if not condition:
        pytest.skip(f"needs {capability}")


def require_gmem_flags(vm: Vm, flags: int) -> None:
    """Skip unless KVM_CAP_GUEST_MEMFD_FLAGS on this VM includes ``flags``."""
    have = vm.check_extension(Cap.GUEST_MEMFD_FLAGS)
    names = "|".join(f"GUEST_MEMFD_FLAG_{f.name}" for f in GmemFlag if f & flags)
    require(have & flags == flags, f"{names} in KVM_CAP_GUEST_MEMFD_FLAGS")


def require_private_mem(kvm: Kvm) -> None:
    """Skip unless KVM offers KVM_X86_SW_PROTECTED_VM; fail instead inside the nested runner."""
    if doctor.private_memory(kvm):
        return
    reason = doctor.PRIVATE_MEM_REASON
    if REQUIRE_PRIVATE_MEM:
        pytest.fail(f"VMM_REQUIRE_PRIVATE_MEM=1 but the kernel lacks {reason}")
    pytest.skip(f"needs {reason}")


@pytest.fixture
def private_kvm(kvm: Kvm) -> Kvm:
    """/dev/kvm, after checking it offers private memory (KVM_X86_SW_PROTECTED_VM)."""
    require_private_mem(kvm)
    return kvm


@pytest.fixture
def machine(kvm: Kvm) -> Iterator[Machine]:
    """A one-vCPU machine with 4 MiB of shared memory, guest not loaded yet."""
    with Machine(kvm=kvm) as m:
        yield m


def boot(name: str, kvm: Kvm, **kw: object) -> Machine:
    """A machine with the bundled guest ``name`` loaded (caller closes it)."""
    image = guest.load(name)
    mode = kw.pop("mode", None)
    arg = kw.pop("arg", 0)
    m = Machine(kvm=kvm, vcpus=kw.pop("vcpus", image.vcpus), **kw)  # type: ignore[arg-type]
    try:
        m.load(image, mode=mode, arg=arg)  # type: ignore[arg-type]
    except BaseException:
        m.close()
        raise
    return m
