"""Machine checks routed into a guest (KVM_X86_SETUP_MCE, KVM_X86_SET_MCE) and reported by its #MC
stub with the bank's MCi_STATUS and MCi_ADDR; the binding's bad inputs fail with KvmError naming the
ioctl. Runs on the host (kvm_pvm 6.18 offers KVM_CAP_MCE: 32 banks, MCG_CTL_P|MCG_SER_P) and nested."""

from __future__ import annotations

import errno

import pytest

from vmm import Kvm
from vmm.errors import GuestAssertion, GuestException, KvmError, UnexpectedExit
from vmm.guest import x86
from vmm.kvm import uapi
from vmm.kvm.uapi import Cap, ExitReason
from vmm.tools.pytest_plugin import boot, require

from helpers import expect_sync

POISON_GPA = 0x1234000


def mce_banks(kvm: Kvm) -> int:
    banks = kvm.check_extension(Cap.MCE)
    require(banks > x86.MCE_BANKS - 1, f"KVM_CAP_MCE with {x86.MCE_BANKS} banks")
    return banks


@pytest.mark.parametrize("action_required", [True, False], ids=["AR", "AO"])
def test_injected_mce_reaches_guest_handler(kvm: Kvm, action_required: bool) -> None:
    """SETUP_MCE, then SET_MCE with an uncorrected memory error: the guest (CR4.MCE set) takes #MC at
    its next instruction and its stub reports bank, MCi_STATUS, MCi_ADDR and MCG_STATUS as injected."""
    mce_banks(kvm)
    with boot("exceptions", kvm, arg=6, output=lambda *_: None) as m:
        m.setup_mce()
        expect_sync(m.run(timeout=10), 1)
        m.inject_mce(0, POISON_GPA, action_required)
        with pytest.raises(GuestException) as e:
            m.run(timeout=10)
    ex, sent = e.value, x86.machine_check(POISON_GPA, action_required)
    assert (ex.vector, ex.name, ex.bank) == (18, "#MC", x86.MCE_BANKS - 1)
    assert (ex.mc_status, ex.mc_addr, ex.error_code) == (sent.status, POISON_GPA, sent.mcg_status)
    assert f"MCi_ADDR {POISON_GPA:#x}" in str(ex)


def test_mce_without_cr4_mce_is_a_triple_fault(kvm: Kvm) -> None:
    """A guest that never set CR4.MCE: KVM turns the uncorrected MCE into a triple fault
    (kvm_vcpu_ioctl_x86_set_mce), KVM_EXIT_SHUTDOWN, reported as such."""
    mce_banks(kvm)
    with boot("hello", kvm, output=lambda *_: None) as m:
        m.setup_mce()
        expect_sync(m.run(timeout=10), 1)
        m.inject_mce(0, POISON_GPA)
        with pytest.raises(UnexpectedExit) as e:
            m.run(timeout=10)
    assert e.value.exit.reason == ExitReason.SHUTDOWN  # type: ignore[attr-defined]


def test_mce_without_setup_is_dropped(kvm: Kvm) -> None:
    """SET_MCE before SETUP_MCE is accepted (KVM creates a vCPU with KVM_MAX_MCE_BANKS banks) but
    every MCi_CTL is still 0, so KVM drops the uncorrected error: no #MC, the guest goes on."""
    mce_banks(kvm)
    with boot("exceptions", kvm, arg=6, output=lambda *_: None) as m:
        expect_sync(m.run(timeout=10), 1)
        m.inject_mce(0, POISON_GPA)
        with pytest.raises(GuestAssertion, match="no #MC arrived"):
            m.run(timeout=10)


def test_mce_bad_arguments(kvm: Kvm) -> None:
    """EINVAL, named: a bank past MCG_CAP's count, a status without MCi_STATUS.VAL; SETUP_MCE with
    no banks, more than KVM_CAP_MCE, or bits KVM does not offer."""
    banks = mce_banks(kvm)
    supported = kvm.mce_cap_supported()
    with boot("hello", kvm, output=lambda *_: None) as m:
        vcpu = m.vcpus[0]
        for bad_cap in (0, banks + 1, x86.MCE_BANKS | (1 << 62)):
            with pytest.raises(KvmError) as e:
                vcpu.setup_mce(bad_cap)
            assert e.value.errno == errno.EINVAL and e.value.call == "KVM_X86_SETUP_MCE"
        vcpu.setup_mce(x86.mcg_cap(x86.MCE_BANKS, supported))
        with pytest.raises(KvmError) as e:
            m.inject_mce(0, POISON_GPA, bank=x86.MCE_BANKS)
        assert e.value.errno == errno.EINVAL and e.value.call == "KVM_X86_SET_MCE"
        assert f"bank={x86.MCE_BANKS:#x}" in str(e.value)
        with pytest.raises(KvmError) as e:
            vcpu.set_mce(uapi.kvm_x86_mce(status=x86.MCI_STATUS_UC, addr=POISON_GPA, bank=0))
        assert e.value.errno == errno.EINVAL
