"""The guest ABI is written down twice, in vmm/guest/layout.py for the host and in guest/include/vmm.h
(and guest/guest.ld) for the guests: preprocess the header and compare, as test_uapi_layout.py does
for <linux/kvm.h>, so the two cannot drift apart."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from vmm.guest import layout
from vmm.guest.image import guest_dir
from vmm.guest.ucall import UcallCmd
from vmm.kvm.uapi import KVM_HC_MAP_GPA_RANGE

pytestmark = pytest.mark.no_kvm

# every name vmm.h must define, with the host's value
SHARED = {
    "UCALL_PORT": layout.UCALL_PORT,
    "DEBUGCON_PORT": layout.DEBUGCON_PORT,
    "UCALL_GPA": layout.UCALL_GPA,
    "UCALL_SLOT": layout.UCALL_SLOT,
    "UCALL_WIDE": layout.UCALL_WIDE,
    "IMAGE_GPA": layout.IMAGE_GPA,
    "IMAGE_END": layout.IMAGE_END,
    "REAL_STACK_TOP": layout.REAL_STACK_TOP,
    "REAL_STACK_SIZE": layout.REAL_STACK_SIZE,
    "STACK_SIZE": layout.STACK_SIZE,
    "DATA_GPA": layout.DATA_GPA,
    "IDT_GPA": layout.IDT_GPA,
    "EXC_TABLE_MAGIC": layout.EXC_TABLE_MAGIC,
    "EXC_STUB_SIZE": layout.EXC_STUB_SIZE,
    "EXC_VECTORS": layout.EXC_VECTORS,
    "EXC_BANK_FOUND": layout.EXC_BANK_FOUND,
    **{f"UCALL_{cmd.name}": int(cmd) for cmd in UcallCmd},
    "KVM_HC_MAP_GPA_RANGE": KVM_HC_MAP_GPA_RANGE,
}


def header_defines() -> dict[str, str]:
    """The object-like macros vmm.h defines, as cpp sees them (-dM) for an assembly guest."""
    if shutil.which("cpp") is None:
        pytest.skip("needs cpp (apt-get install cpp)")
    include = guest_dir() / "include"
    proc = subprocess.run(
        ["cpp", "-nostdinc", "-undef", "-D__ASSEMBLY__", "-dM", f"-I{include}", str(include / "vmm.h")],
        capture_output=True,
        text=True,
        check=True,
    )
    defines = {}
    for line in proc.stdout.splitlines():
        m = re.fullmatch(r"#define (\w+) (.+)", line)
        if m:
            defines[m.group(1)] = m.group(2).strip()
    return defines


def test_header_matches_layout() -> None:
    """Each address, port, size and ucall number in vmm.h has layout.py's value."""
    defines = header_defines()
    mismatches = {
        name: (defines.get(name), hex(value))
        for name, value in SHARED.items()
        if name not in defines or int(defines[name], 0) != value
    }
    assert not mismatches, f"vmm.h vs vmm/guest/layout.py (header, host): {mismatches}"


def test_linker_script_links_at_image_gpa() -> None:
    """guest.ld links every image where Machine.load copies it."""
    script = (guest_dir() / "guest.ld").read_text()
    m = re.search(r"^\s*\.\s*=\s*(0x[0-9a-fA-F]+|\d+)\s*;", script, re.M)
    assert m and int(m.group(1), 0) == layout.IMAGE_GPA, "guest.ld's location counter is not IMAGE_GPA"


def test_layout_regions_do_not_overlap() -> None:
    """Slot 0's fixed pieces lie in order: GDT, IDT (the GDT page's second half), TSS, ucall
    blocks (every vCPU's), real-mode stacks, image, system area."""
    assert layout.GDT_GPA + 0x100 <= layout.IDT_GPA and layout.IDT_GPA + layout.EXC_VECTORS * 16 <= layout.TSS_GPA
    assert layout.TSS_GPA + 0x1000 <= layout.UCALL_GPA
    assert layout.ucall_block(layout.MAX_VCPUS) <= layout.REAL_STACK_TOP
    real_stacks_bottom = layout.REAL_STACK_TOP - layout.REAL_MAX_VCPUS * layout.REAL_STACK_SIZE
    assert layout.ucall_block(layout.REAL_MAX_VCPUS) <= real_stacks_bottom
    assert layout.GDT_GPA < layout.TSS_GPA < layout.REAL_STACK_TOP <= layout.IMAGE_GPA < layout.IMAGE_END
    assert layout.IMAGE_END <= layout.SYSTEM_GPA < layout.DATA_GPA
