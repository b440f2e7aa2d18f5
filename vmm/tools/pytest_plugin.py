"""pytest plugin: vmm's fixtures and capability gates, for tests in any directory.

Installed with the package (pytest11 entry point ``vmm``), so after ``pip install vmm-gmem`` a test
file anywhere can ask for ``kvm``, ``vm``, ``machine``, ``private_kvm`` or ``private_machine``, and
call the ``require*`` gates, which skip with the missing capability's name (the kernel selftests'
TEST_REQUIRE). With VMM_REQUIRE_PRIVATE_MEM=1 (set inside `vmm nested`) a missing private-memory
capability fails instead of skipping: in the nested kernel that skip would hide a broken kernel.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from vmm.errors import VmmError
from vmm.guest import Machine, load_guest
from vmm.kvm import Cap, GmemFlag, Kvm, Vm, VmType
from vmm.kvm.caps import PRIVATE_MEM_REASON, private_memory
from vmm.kvm.system import KVM_DEVICE, access_advice

__all__ = ["boot", "require", "require_gmem_flags", "require_poisonable", "require_private_mem"]


def require(condition: bool, capability: str) -> None:
    """Skip unless the host has ``capability`` (a skip's reason always names it)."""
    if not condition:
        pytest.skip(f"needs {capability}")


def require_gmem_flags(vm: Vm, flags: int) -> None:
    """Skip unless KVM_CAP_GUEST_MEMFD_FLAGS on this VM includes ``flags``."""
    have = vm.check_extension(Cap.GUEST_MEMFD_FLAGS)
    names = "|".join(f"GUEST_MEMFD_FLAG_{f.name}" for f in GmemFlag if f & flags)
    require(have & flags == flags, f"{names} in KVM_CAP_GUEST_MEMFD_FLAGS")


def require_poisonable() -> None:
    """Skip unless pages may be poisoned here: inside a nested test kernel (VMM_NESTED=1, never on
    the host: MADV_HWPOISON retires a physical page for good), as root, with CONFIG_MEMORY_FAILURE."""
    require(os.environ.get("VMM_NESTED") == "1", "a nested test kernel to poison pages in (VMM_NESTED=1, `vmm nested`)")
    require(os.geteuid() == 0, "root (CAP_SYS_ADMIN) for MADV_HWPOISON")
    require(os.path.exists("/proc/sys/vm/memory_failure_early_kill"), "CONFIG_MEMORY_FAILURE")


def require_private_mem(kvm: Kvm) -> None:
    """Skip unless KVM offers KVM_X86_SW_PROTECTED_VM; fail instead when VMM_REQUIRE_PRIVATE_MEM=1."""
    if private_memory(kvm):
        return
    if os.environ.get("VMM_REQUIRE_PRIVATE_MEM") == "1":
        pytest.fail(f"VMM_REQUIRE_PRIVATE_MEM=1 but the kernel lacks {PRIVATE_MEM_REASON}")
    pytest.skip(f"needs {PRIVATE_MEM_REASON}")


@pytest.fixture(scope="session")
def kvm() -> Iterator[Kvm]:
    """/dev/kvm, opened once for the session. Without it (no device, or no read/write access to it)
    every test that asks for it skips with one reason naming what is missing, and the tests that
    do not need it still run; with VMM_REQUIRE_PRIVATE_MEM=1 (the nested kernel) that fails instead."""
    try:
        k = Kvm()
    except VmmError as e:
        path = os.environ.get("VMM_KVM_DEVICE") or KVM_DEVICE
        cause = e.__context__  # the os.open error Kvm() turned into a one-line message
        if isinstance(cause, FileNotFoundError):
            reason = f"needs {path} ({e})"
        elif isinstance(cause, PermissionError):
            reason = f"needs read/write access to {path} ({access_advice(path)})"
        else:
            raise  # the device is there and may be opened, but is not usable: an error, not a skip
        if os.environ.get("VMM_REQUIRE_PRIVATE_MEM") == "1":
            pytest.fail(f"VMM_REQUIRE_PRIVATE_MEM=1 but the test kernel's {reason}")
        pytest.skip(reason)
    with k:
        yield k


@pytest.fixture
def vm(kvm: Kvm) -> Iterator[Vm]:
    """A fresh default VM."""
    with kvm.create_vm() as v:
        yield v


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


@pytest.fixture
def private_machine(private_kvm: Kvm) -> Iterator[Machine]:
    """A one-vCPU KVM_X86_SW_PROTECTED_VM machine whose handlers convert on MAP_GPA_RANGE; add
    private-capable memory with ``add_private_memory``, then load a guest."""
    with Machine(kvm=private_kvm, vm_type=VmType.SW_PROTECTED) as m:
        yield m


def boot(name: str, kvm: Kvm, **kw: object) -> Machine:
    """A machine with the bundled guest ``name`` loaded (the caller closes it); ``mode`` and ``arg``
    go to Machine.load, everything else to Machine()."""
    image = load_guest(name)
    mode = kw.pop("mode", None)
    arg = kw.pop("arg", 0)
    m = Machine(kvm=kvm, vcpus=kw.pop("vcpus", image.vcpus), **kw)  # type: ignore[arg-type]
    try:
        m.load(image, mode=mode, arg=arg)  # type: ignore[arg-type]
    except BaseException:
        m.close()
        raise
    return m
