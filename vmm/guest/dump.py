"""Human-readable vCPU state for failure messages: registers, segments, and the code at RIP."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmm.errors import VmmError

if TYPE_CHECKING:
    from vmm.memory.regions import GuestMemory
    from vmm.kvm.vcpu import Vcpu

CODE_BYTES = 16


def code_at_rip(vcpu: "Vcpu", memory: "GuestMemory") -> tuple[int, bytes]:
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


def vcpu_state(vcpu: "Vcpu", memory: "GuestMemory") -> str:
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
