"""The guest->host ucall ABI: SYNC with values, PRINT, DONE, and a failing GUEST_ASSERT_EQ whose
host-side message shows the guest source file, line, expression and both values."""

from __future__ import annotations

import struct

import pytest

from vmm import GuestAssertion, Kvm, Machine, Ucall, UcallCmd, load_guest
from vmm.errors import VmmError
from vmm.guest import image as guest_image
from vmm.guest.layout import MAX_VCPUS, REAL_MAX_VCPUS, UCALL_WIDE, ucall_block
from vmm.tools.pytest_plugin import boot


def test_sync_print_done(kvm: Kvm) -> None:
    """hello prints twice, syncs stage 1 with its vCPU id, then finishes with DONE."""
    printed: list[tuple[int, str]] = []
    image = load_guest("hello")
    with Machine(kvm=kvm, output=lambda v, text: printed.append((v, text))) as m:
        m.load(image)
        first = m.run(timeout=5)
        assert isinstance(first, Ucall) and first.cmd == UcallCmd.SYNC and first.args[:2] == (1, 0)
        last = m.run(timeout=5)
        assert isinstance(last, Ucall) and last.cmd == UcallCmd.DONE
    assert printed == [(0, "hello from a long-mode guest"), (0, "memory check passed")]


@pytest.mark.parametrize("mode", ["long", "real"])
def test_print_in_both_modes(kvm: Kvm, mode: str) -> None:
    """PRINT works from 16-bit and 64-bit code alike (GS at the block: a selector in real mode)."""
    printed: list[str] = []
    name = "real_mode" if mode == "real" else "hello"
    with Machine(kvm=kvm, output=lambda v, text: printed.append(text)) as m:
        m.load(load_guest(name))
        m.runners[0].run_until_done(timeout=5)
    assert printed and printed[0].startswith("hello from")


def test_guest_assert_reports_line_and_values(kvm: Kvm) -> None:
    """A failed GUEST_ASSERT_EQ raises GuestAssertion naming assert_fail.S, its line, and 41 vs 42."""
    source = guest_image.bundled()["assert_fail"]
    line = next(
        i for i, text in enumerate(source.read_text().splitlines(), 1) if text.strip().startswith("GUEST_ASSERT_EQ(")
    )
    with boot("assert_fail", kvm) as m:
        with pytest.raises(GuestAssertion) as failure:
            m.run(timeout=5)
    e = failure.value
    assert (e.file, e.line, e.a, e.b) == ("assert_fail.S", line, 41, 42)
    assert e.expr == "%rax == $42"
    message = str(e)
    assert f"assert_fail.S:{line}" in message and "0x29 != 0x2a" in message
    assert "GUEST_ASSERT_EQ(%rax, $42)" in message  # the source line itself


def test_ucall_block_is_read_from_guest_memory(kvm: Kvm) -> None:
    """hello's SYNC(1, vCPU id) lies in vCPU 0's block at UCALL_GPA: header SYNC, 2 arguments, wide."""
    with boot("hello", kvm) as m:
        m.run(timeout=5)
        header, pad, stage, value = struct.unpack("<IIQQ", m.memory.read(ucall_block(0), 24))
        assert header == UcallCmd.SYNC | 2 << 8 | UCALL_WIDE and (stage, value) == (1, 0)
        assert m.vcpus[0].get_sregs().gs.base == ucall_block(0)


def test_each_vcpu_has_its_own_block(kvm: Kvm) -> None:
    """smp's 4 vCPUs SYNC their ids at once: each id comes back from its own block (GS.base)."""
    syncs: list[Ucall] = []
    with boot("smp", kvm, vcpus=4) as m:
        results = m.run_all(timeout=20, on_sync=syncs.append)
        assert all(isinstance(r, Ucall) and r.cmd == UcallCmd.DONE for r in results)
        assert sorted((s.vcpu_id, s.args[:2]) for s in syncs) == [(i, (1, i)) for i in range(4)]
        assert [v.get_sregs().gs.base for v in m.vcpus] == [ucall_block(i) for i in range(4)]


def test_real_mode_arguments_are_32_bit(kvm: Kvm) -> None:
    """A real-mode SYNC stores 32-bit halves (no UCALL_WIDE): the host reads the low halves only,
    whatever the high halves of the slots hold."""
    with boot("real_mode", kvm) as m:
        m.memory.write(ucall_block(0) + 8, b"\xff" * 48)  # garbage in every slot's high half
        first = m.run(timeout=5)
        assert isinstance(first, Ucall) and first.cmd == UcallCmd.SYNC and first.args == (1, 0, 0, 0, 0, 0)
        header = struct.unpack("<I", m.memory.read(ucall_block(0), 4))[0]
        assert header & UCALL_WIDE == 0


def test_too_many_vcpus_are_refused(kvm: Kvm) -> None:
    """One ucall block per vCPU: a machine past MAX_VCPUS, or a real-mode guest past REAL_MAX_VCPUS
    (its stacks would meet the blocks), is refused with the limit named."""
    with pytest.raises(VmmError, match=f"1 to {MAX_VCPUS} vCPUs"):
        Machine(kvm=kvm, vcpus=MAX_VCPUS + 1)
    with Machine(kvm=kvm, vcpus=REAL_MAX_VCPUS + 1) as m:
        with pytest.raises(VmmError, match=f"at most {REAL_MAX_VCPUS} vCPUs"):
            m.load(load_guest("real_mode"))
