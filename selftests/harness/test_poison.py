"""What vmm's poison handling does on any host, without poisoning anything: poisoning is refused
outside a nested test kernel (library and CLI, one line naming why), `vmm boot --poison` refuses bad
values, and a SIGBUS sent to a vCPU thread inside KVM_RUN ends the run with an error, never the
process, while a SIGBUS anywhere else keeps the action it had. The poisoning itself is tested in the
nested kernels: selftests/kvm/test_guest_memfd_memory_failure.py."""

from __future__ import annotations

import faulthandler
import signal
import subprocess
import sys
import threading

import pytest

from vmm import Kvm, Machine, load_guest
from vmm.errors import GuestTimeout, VcpuStopped, VmmError
from vmm.guest.layout import DATA_GPA
from vmm.memory import poison

from helpers import ROOT, one_line_error, run_vmm

pytestmark = pytest.mark.host_only


def test_poison_refused_outside_nested(kvm: Kvm, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without VMM_NESTED=1 poison() and write_hwpoison() refuse, naming why, and touch nothing."""
    monkeypatch.delenv("VMM_NESTED", raising=False)
    with Machine(kvm=kvm) as m:
        m.add_memory(DATA_GPA, 1 << 20)
        m.memory.write(DATA_GPA, b"\x5a" * 8)
        for side in ("shared", "private"):
            with pytest.raises(VmmError, match="only inside a nested test kernel") as e:
                poison.poison(m.memory, DATA_GPA, side)
            assert "\n" not in str(e.value)
        with pytest.raises(VmmError, match="VMM_NESTED=1"):
            poison.write_hwpoison(1)
        assert not m.memory.poisoned and m.memory.read(DATA_GPA, 8) == b"\x5a" * 8


def test_poisoned_page_refused_to_host_access(kvm: Kvm) -> None:
    """A page in memory.poisoned is refused to vmm's host accesses (a read would SIGBUS vmm itself);
    its neighbours are not; discard() forgets it."""
    with Machine(kvm=kvm) as m:
        m.add_memory(DATA_GPA, 1 << 20)
        m.memory.poisoned.add(DATA_GPA + 0x1000)
        with pytest.raises(VmmError, match="0x100001000 is poisoned"):
            m.memory.read(DATA_GPA + 0xFF8, 16)
        assert m.memory.read(DATA_GPA, 0x1000) == bytes(0x1000)
        assert m.memory.read(DATA_GPA + 0x2000, 8) == bytes(8)
        poison.discard(m.memory, DATA_GPA + 0x1234)
        assert m.memory.read(DATA_GPA + 0x1000, 8) == bytes(8)


@pytest.mark.parametrize("replaced", [False, True], ids=["", "handler_replaced_after_create"])
def test_sigbus_in_kvm_run_ends_the_run_not_the_process(kvm: Kvm, replaced: bool) -> None:
    """A SIGBUS (here kill's, si_code SI_TKILL: no memory error) sent to the thread inside KVM_RUN
    stops that run with a clear error; the process and the vCPU live on. Also when another SIGBUS
    handler was installed after the vCPU was made (faulthandler.enable(), as pytest does)."""
    with Machine(kvm=kvm, output=lambda *_: None) as m:
        m.load(load_guest("exits"), arg=6)  # spins
        if replaced:
            faulthandler.enable()
        timer = threading.Timer(0.3, signal.pthread_kill, (threading.main_thread().ident, signal.SIGBUS))
        timer.start()
        try:
            with pytest.raises(VcpuStopped, match="SIGBUS .*not a memory error"):
                m.run(timeout=10)
        finally:
            timer.cancel()
        with pytest.raises(GuestTimeout):
            m.run(timeout=0.3)


def test_sigbus_elsewhere_keeps_its_action() -> None:
    """Outside KVM_RUN vmm's SIGBUS handler hands the signal back to the action before it: the
    default one still kills the process (with SIGBUS, as without vmm)."""
    script = (
        "import os, signal\nfrom vmm import Machine\n"
        "with Machine() as m:\n    os.kill(os.getpid(), signal.SIGBUS)\n    print('survived')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGBUS and "survived" not in proc.stdout, (proc.returncode, proc.stderr)


@pytest.mark.parametrize(
    "value, message",
    [
        ("xyz", "--poison 'xyz' is not a guest physical address"),
        ("-1", "a guest physical address is not negative"),
        ("0x200000", "only inside a nested test kernel (VMM_NESTED=1"),
    ],
)
def test_boot_poison_bad_values(value: str, message: str) -> None:
    """`vmm boot --poison` refuses a non-number, a negative address, and any poisoning outside a
    nested kernel: one line, exit 2, before a VM exists."""
    assert message in one_line_error(run_vmm("boot", "poison_touch", "--poison", value, env={"VMM_NESTED": ""}))
