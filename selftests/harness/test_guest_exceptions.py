"""Test guests get an IDT (long mode) or IVT (real mode) whose stubs report CPU exceptions through
UCALL_EXCEPTION (guest/include/vmm_exceptions.h): the run ends in a GuestException naming the vector,
error code, RIP and CR2 instead of a silent triple fault (the kernel selftests' UCALL_UNHANDLED)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmm import Kvm, Machine, load_guest
from vmm.errors import GuestException, UnexpectedExit
from vmm.guest import x86
from vmm.guest.layout import EXC_STUB_SIZE, EXC_VECTORS, IDT_GPA, IMAGE_GPA
from vmm.kvm.exits import InternalErrorExit
from vmm.kvm.uapi import ExitReason, InternalError
from vmm.tools.pytest_plugin import boot

KVM_PVM = os.path.isdir("/sys/module/kvm_pvm")
UNMAPPED_GPA = 0x40000000000  # guest/exceptions.S's address no page table maps
PF_WRITE = 1 << 1  # #PF error code: the access was a write (bit 0 clear: the page was not present)


def raise_exception(kvm: Kvm, selector: int, guest: str = "exceptions") -> GuestException:
    with boot(guest, kvm, arg=selector, output=lambda *_: None) as m:
        with pytest.raises(GuestException) as e:
            m.run(timeout=10)
        code = m.memory.read(e.value.rip, 2)
    ex = e.value
    assert ex.vcpu_id == 0 and str(ex).startswith(f"vCPU 0: guest exception {ex.name} (vector {ex.vector})")
    ex.code = code  # type: ignore[attr-defined]
    return ex


def test_undefined_opcode(kvm: Kvm) -> None:
    """ud2: #UD, a fault, so RIP is the ud2 itself."""
    ex = raise_exception(kvm, 0)
    assert (ex.vector, ex.name, ex.error_code) == (6, "#UD", 0)
    assert ex.code == b"\x0f\x0b"  # type: ignore[attr-defined]


def test_divide_error(kvm: Kvm) -> None:
    """div by zero: #DE at the div (f7 f1: div %ecx)."""
    ex = raise_exception(kvm, 1)
    assert (ex.vector, ex.name) == (0, "#DE")
    assert ex.code == b"\xf7\xf1"  # type: ignore[attr-defined]


def test_page_fault_on_unmapped_address(kvm: Kvm) -> None:
    """A write to an address no page table maps: #PF with CR2 = that address, error code W/not-present."""
    ex = raise_exception(kvm, 2)
    assert (ex.vector, ex.name, ex.cr2, ex.error_code) == (14, "#PF", UNMAPPED_GPA, PF_WRITE)
    assert f"cr2 {UNMAPPED_GPA:#x}" in str(ex)


def test_breakpoint(kvm: Kvm) -> None:
    """int3: #BP, a trap, so RIP is past the int3. kvm_pvm (the 6.18 host) cannot emulate int3 in a
    64-bit guest: KVM_RUN exits KVM_EXIT_INTERNAL_ERROR (EMULATION) there instead (seen on that host);
    VMX/SVM (the nested kernels) deliver it."""
    if KVM_PVM:
        with boot("exceptions", kvm, arg=3, output=lambda *_: None) as m:
            with pytest.raises(UnexpectedExit) as e:
                m.run(timeout=10)
        assert isinstance(e.value.exit, InternalErrorExit) and e.value.exit.suberror == InternalError.EMULATION
        return
    ex = raise_exception(kvm, 3)
    assert (ex.vector, ex.name) == (3, "#BP")
    assert ex.code[:1] != b"\xcc"  # type: ignore[attr-defined]


def test_general_protection(kvm: Kvm) -> None:
    """A load from a non-canonical address: #GP(0)."""
    ex = raise_exception(kvm, 4)
    assert (ex.vector, ex.name, ex.error_code) == (13, "#GP", 0)


def test_broken_idt_ends_in_shutdown(kvm: Kvm) -> None:
    """A guest that loads an IDT of limit 0 then faults: #UD, #GP and #DF cannot be delivered, a
    triple fault: KVM_EXIT_SHUTDOWN, a clear error naming it, within the timeout (no hang)."""
    with boot("exceptions", kvm, arg=5, output=lambda *_: None) as m:
        with pytest.raises(UnexpectedExit) as e:
            m.run(timeout=10)
    assert e.value.exit.reason == ExitReason.SHUTDOWN  # type: ignore[attr-defined]
    assert "triple fault" in str(e.value)


@pytest.mark.parametrize("selector, vector, name", [(0, 6, "#UD"), (1, 0, "#DE"), (3, 3, "#BP")])
def test_real_mode_exceptions(kvm: Kvm, selector: int, vector: int, name: str) -> None:
    """Real mode: the IVT at 0 points at the 16-bit stubs; RIP is CS*16+IP of the frame."""
    ex = raise_exception(kvm, selector, "exceptions_real")
    assert (ex.vector, ex.name) == (vector, name)
    assert IMAGE_GPA <= ex.rip < IMAGE_GPA + 0x1000


@pytest.mark.host_only
def test_idt_points_at_the_stubs(kvm: Kvm) -> None:
    """The IDTR is IDT_GPA with 32 gates; gate n's handler is the image's stub n."""
    with boot("hello", kvm, output=lambda *_: None) as m:
        image = load_guest("hello").binary
        stubs = x86.exception_stubs(image)
        assert stubs is not None and stubs[1] == 64
        idt = m.vcpus[0].get_sregs().idt
        assert (idt.base, idt.limit) == (IDT_GPA, EXC_VECTORS * 16 - 1)
        gate = m.memory.read(IDT_GPA + 14 * 16, 16)
        handler = int.from_bytes(gate[0:2], "little") | int.from_bytes(gate[6:8], "little") << 16
        assert handler == stubs[0] + 14 * EXC_STUB_SIZE


@pytest.mark.host_only
def test_image_without_stubs_gets_no_idt(kvm: Kvm) -> None:
    """A flat binary built without vmm.h has no stub table: no IDT is written (the IDTR stays KVM's)."""
    with Machine(kvm=kvm) as m:
        m.load(b"\xf4")  # hlt
        assert m.vcpus[0].get_sregs().idt.base != IDT_GPA
        assert m.run(timeout=5).reason == ExitReason.HLT  # type: ignore[union-attr]


@pytest.mark.no_kvm
def test_stub_table_is_checked() -> None:
    """A magic with a stub address outside the image, or an unknown code size, is no table."""
    magic = x86.EXC_TABLE_MAGIC.to_bytes(8, "little")
    image = bytes(EXC_VECTORS * EXC_STUB_SIZE) + magic
    good = image + IMAGE_GPA.to_bytes(8, "little") + (64).to_bytes(8, "little")
    assert x86.exception_stubs(good) == (IMAGE_GPA, 64)
    assert (
        x86.exception_stubs(image + (IMAGE_GPA + 0x100000).to_bytes(8, "little") + (64).to_bytes(8, "little")) is None
    )
    assert x86.exception_stubs(image + IMAGE_GPA.to_bytes(8, "little") + (32).to_bytes(8, "little")) is None
    assert x86.exception_stubs(b"\x00" + good) is None  # the table is 8-byte aligned


HOSTILE_EXCEPTION = """/* vmm-guest: mode=long vcpus=1 description="a forged exception report" */
#include <vmm.h>
GUEST_ENTRY
    mov $0x1ff, %r8                     /* vector 255 and a bank number, without EXC_BANK_FOUND */
    movabs $0xfffffffffffff000, %r9     /* RIP outside guest memory */
    ucall UCALL_EXCEPTION, %r8, $0, %r9, $0, $0, $0
    GUEST_FAIL("resumed after an exception report")
"""


@pytest.mark.host_only
def test_forged_exception_report(kvm: Kvm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest's UCALL_EXCEPTION is its word: a reserved vector, bits it should not set and a RIP
    outside guest memory give a GuestException naming what was sent (no bank, no code bytes)."""
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "forged.S"
    source.write_text(HOSTILE_EXCEPTION)
    with Machine(kvm=kvm, output=lambda *_: None) as m:
        m.load(load_guest(str(source)))
        with pytest.raises(GuestException) as e:
            m.run(timeout=10)
    ex = e.value
    assert (ex.vector, ex.name, ex.bank, ex.rip) == (255, "vector 255", None, 0xFFFFFFFFFFFFF000)
    assert "code at" not in str(ex)
