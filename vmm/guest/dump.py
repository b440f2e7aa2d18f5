"""Human-readable failure messages: vCPU state (registers, segments, the code at RIP), guest
strings shown as data, and the source line of a failed guest assert."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from vmm.errors import VmmError

if TYPE_CHECKING:
    from vmm.kvm.vcpu import Vcpu
    from vmm.memory.regions import GuestMemory

CODE_BYTES = 16
#: bytes of a guest source file read at most to show a failed assert's line
SOURCE_MAX = 1 << 20
#: characters of that line shown at most
SOURCE_LINE_MAX = 200
_NOT_SHOWN = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


def printable(text: str) -> str:
    """``text`` as data: every non-printable character (terminal escapes, CR, NUL, bidi overrides;
    tab is kept) becomes its Python escape, so a guest string cannot drive the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == "\t" else c.encode("unicode_escape").decode("ascii") for c in text)


def guest_text(raw: bytes) -> str:
    """Bytes from the guest as printable text (bytes that are not UTF-8 as \\xNN)."""
    return printable(raw.decode("utf-8", "backslashreplace"))


def source_line(source: Path | None, file: str, line: int) -> str:
    """Line ``line`` of the guest's own source ``source`` when the guest-supplied ``file`` (its
    ``__FILE__``) is that source's name, else "". The guest only picks the line: the path is the
    host's, never one the guest names."""
    if source is None or file != source.name:
        return ""
    return read_source_line(source, line)


def read_source_line(path: Path, line: int, follow_symlinks: bool = True) -> str:
    """Line ``line`` (1-based) of ``path`` as printable text, "" when there is none: only a regular
    file is read (opened non-blocking, so a FIFO or device never hangs or floods the host), and only
    its first SOURCE_MAX bytes."""
    if not 0 < line <= SOURCE_MAX:
        return ""
    try:
        fd = os.open(path, _NOT_SHOWN | (0 if follow_symlinks else os.O_NOFOLLOW))
    except OSError:
        return ""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        data = os.read(fd, SOURCE_MAX)
    except OSError:
        return ""
    finally:
        os.close(fd)
    lines = data.split(b"\n", line)
    return guest_text(lines[line - 1])[:SOURCE_LINE_MAX] if len(lines) >= line else ""


def code_at_rip(vcpu: Vcpu, memory: GuestMemory) -> tuple[int, bytes]:
    """The guest-physical address of RIP (identity paging or real-mode CS.base) and the bytes there."""
    regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    gpa = regs.rip if sregs.cr0 & 1 else sregs.cs.base + (regs.rip & 0xFFFF)
    try:
        region = memory.region_at(gpa)
        return gpa, memory.read(gpa, min(CODE_BYTES, region.end - gpa))
    except VmmError:
        return gpa, b""


def disassemble(code: bytes, address: int, sixteen_bit: bool) -> list[str]:
    """Instructions in ``code`` via capstone when installed, else an empty list."""
    try:
        import capstone
    except ImportError:
        return []
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_16 if sixteen_bit else capstone.CS_MODE_64)
    return [f"{i.address:#x}: {i.mnemonic} {i.op_str}".rstrip() for i in md.disasm(code, address)][:4]


def vcpu_state(vcpu: Vcpu, memory: GuestMemory) -> str:
    """Multi-line dump of ``vcpu``: general registers, control registers and the code at RIP."""
    try:
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    except OSError as e:
        return f"  (registers unavailable: {e})"
    names = [f[0] for f in regs._fields_]
    lines = []
    for i in range(0, len(names), 4):
        lines.append("  " + "  ".join(f"{n:>6}={getattr(regs, n):016x}" for n in names[i : i + 4]))
    lines.append(
        f"     cr0={sregs.cr0:#x} cr3={sregs.cr3:#x} cr4={sregs.cr4:#x} efer={sregs.efer:#x} "
        f"cs={sregs.cs.selector:#x} (base {sregs.cs.base:#x}, l={sregs.cs.l})"
    )
    gpa, code = code_at_rip(vcpu, memory)
    if code:
        lines.append(f"  code at {gpa:#x}: {code.hex(' ')}")
        for insn in disassemble(code, gpa, sixteen_bit=not sregs.cr0 & 1):
            lines.append(f"    {insn}")
    else:
        lines.append(f"  code at {gpa:#x}: not in guest memory")
    return "\n".join(lines)
