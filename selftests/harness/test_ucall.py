"""The guest->host ucall ABI: SYNC with values, PRINT, DONE, and a failing GUEST_ASSERT_EQ whose
host-side message shows the guest source file, line, expression and both values."""

from __future__ import annotations

import pytest

from vmm import GuestAssertion, Kvm, Machine, Ucall, UcallCmd, load_guest
from vmm.guest import image as guest_image
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
    """PRINT works from 16-bit and 64-bit code alike (the block is built on the stack)."""
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
    """The SYNC block lies on the guest stack: its address (the OUT value) is inside slot 0."""
    with boot("hello", kvm) as m:
        m.run(timeout=5)
        run = m.vcpus[0].kvm_run
        addr = int.from_bytes(m.vcpus[0].run_bytes[run.io.data_offset : run.io.data_offset + 4], "little")
        assert m.memory.read(addr, 16) == (1).to_bytes(8, "little") * 2  # cmd SYNC, stage 1
