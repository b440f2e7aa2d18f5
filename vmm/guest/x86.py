"""x86 vCPU set-up for test guests: 16-bit real mode, or 64-bit long mode with a GDT and identity
page tables built by the VMM (as the kernel selftests' lib/x86_64/processor.c does)."""

from __future__ import annotations

import struct
from array import array
from enum import Enum
from typing import Iterable

from vmm.kvm import uapi
from vmm.errors import VmmError
from vmm.memory.regions import HUGE_PAGE_SIZE, PAGE_SIZE, GuestMemory
from vmm.kvm.vcpu import Vcpu

from .layout import EXC_STUB_SIZE, EXC_TABLE_MAGIC, EXC_VECTORS, GDT_GPA, IDT_GPA, IMAGE_GPA, SYSTEM_GPA, TSS_GPA


PTE_PRESENT, PTE_WRITE, PTE_LARGE = 1 << 0, 1 << 1, 1 << 7
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1 << 0, 1 << 1, 1 << 4, 1 << 5, 1 << 16, 1 << 31
CR4_PAE, CR4_MCE, CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 5, 1 << 6, 1 << 9, 1 << 10
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
SEL_CODE, SEL_DATA, SEL_TSS = 0x08, 0x10, 0x18


#: The SDM's mnemonics of vectors 0-31 (Vol. 3A, Table 6-1); the rest are reserved.
EXCEPTION_NAMES = {
    0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF",
    9: "coprocessor segment overrun", 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF",
    17: "#AC", 18: "#MC", 19: "#XM", 20: "#VE", 21: "#CP", 28: "#HV", 29: "#VC", 30: "#SX",
}  # fmt: skip
MC_VECTOR = 18
_GATE_INTERRUPT = 0x8E  # present, DPL 0, 64-bit interrupt gate


# Machine-check architecture (SDM Vol. 3B, 16.3): MCG_CAP, MCG_STATUS and MCi_STATUS bits.
MCG_CTL_P, MCG_SER_P = 1 << 8, 1 << 24
MCG_STATUS_RIPV, MCG_STATUS_EIPV, MCG_STATUS_MCIP = 1 << 0, 1 << 1, 1 << 2
MCI_STATUS_VAL, MCI_STATUS_OVER, MCI_STATUS_UC, MCI_STATUS_EN = 1 << 63, 1 << 62, 1 << 61, 1 << 60
MCI_STATUS_MISCV, MCI_STATUS_ADDRV, MCI_STATUS_PCC, MCI_STATUS_S, MCI_STATUS_AR = (
    1 << 59, 1 << 58, 1 << 57, 1 << 56, 1 << 55
)  # fmt: skip
#: MCACOD of a data load that hit poison (SRAR, action required) and of a memory scrubber's find (SRAO)
MCACOD_DATA_LOAD, MCACOD_SCRUB = 0x134, 0xC0
#: MCi_MISC address mode "physical address" (bits 8:6) with the address's least significant bit 12
MCI_MISC_PHYS_PAGE = (2 << 6) | 12
#: banks vmm gives a vCPU (QEMU's MCE_BANKS_DEF); QEMU reports guest memory errors in the last one
MCE_BANKS = 10


def mcg_cap(banks: int, supported: int) -> int:
    """MCG_CAP for KVM_X86_SETUP_MCE: ``banks`` banks with MCG_CTL_P and MCG_SER_P where KVM offers them."""
    return banks | (supported & (MCG_CTL_P | MCG_SER_P))


def machine_check(gpa: int, action_required: bool = True, bank: int = MCE_BANKS - 1) -> uapi.kvm_x86_mce:
    """The uncorrected memory error at ``gpa`` as QEMU's kvm_mce_inject() reports a SIGBUS on guest
    memory: action required (BUS_MCEERR_AR, the vCPU consumed the poison: data load, RIPV|EIPV) or
    optional (BUS_MCEERR_AO, found asynchronously: RIPV only)."""
    status = MCI_STATUS_VAL | MCI_STATUS_UC | MCI_STATUS_EN | MCI_STATUS_MISCV | MCI_STATUS_ADDRV | MCI_STATUS_S
    mcg_status = MCG_STATUS_MCIP | MCG_STATUS_RIPV
    if action_required:
        status |= MCI_STATUS_AR | MCACOD_DATA_LOAD
        mcg_status |= MCG_STATUS_EIPV
    else:
        status |= MCACOD_SCRUB
    return uapi.kvm_x86_mce(status=status, addr=gpa, misc=MCI_MISC_PHYS_PAGE, mcg_status=mcg_status, bank=bank)


def exception_name(vector: int) -> str:
    """ "#GP" for 13; "vector N" for the reserved ones."""
    return EXCEPTION_NAMES.get(vector, f"vector {vector}")


def exception_stubs(image: bytes) -> tuple[int, int] | None:
    """Where the image's exception stubs are (their GPA) and the code size they were built for (16
    or 64), from the table vmm_exceptions.h puts in every guest (found by its magic, as a multiboot
    loader finds its header); None for an image without one (a flat binary not built with vmm.h)."""
    magic = struct.pack("<Q", EXC_TABLE_MAGIC)
    at = image.find(magic)
    while at >= 0 and at % 8:
        at = image.find(magic, at + 1)
    if at < 0 or at + 24 > len(image):
        return None
    stubs, bits = struct.unpack_from("<QQ", image, at + 8)
    if bits not in (16, 64) or not IMAGE_GPA <= stubs <= IMAGE_GPA + len(image) - EXC_VECTORS * EXC_STUB_SIZE:
        return None
    return stubs, bits


def write_idt(memory: GuestMemory, stubs: int) -> tuple[int, int]:
    """A long-mode IDT at IDT_GPA whose vectors 0-31 are interrupt gates to the stubs (code
    selector, no IST); returns (base, limit) for the IDTR."""
    gates = bytearray()
    for vector in range(EXC_VECTORS):
        handler = stubs + vector * EXC_STUB_SIZE
        low = (handler & 0xFFFF) | (SEL_CODE << 16) | (_GATE_INTERRUPT << 40) | (((handler >> 16) & 0xFFFF) << 48)
        gates += struct.pack("<QQ", low, handler >> 32)
    memory.write(IDT_GPA, gates)
    return IDT_GPA, len(gates) - 1


def write_ivt(memory: GuestMemory, stubs: int) -> None:
    """Real mode: IVT entries 0-31 (segment:offset at GPA 0) pointing at the 16-bit stubs."""
    entries = b"".join(struct.pack("<HH", (a := stubs + v * EXC_STUB_SIZE) & 0xF, a >> 4) for v in range(EXC_VECTORS))
    memory.write(0, entries)


class Mode(str, Enum):
    """CPU mode a guest starts in."""

    REAL = "real"
    LONG = "long"


class PageAllocator:
    """Bump allocator of zeroed guest pages inside slot 0, for page tables and stacks."""

    def __init__(self, memory: GuestMemory, start: int = SYSTEM_GPA) -> None:
        self.memory = memory
        self.next = start
        self.limit = memory.region_at(0).end

    def alloc(self, size: int) -> int:
        """Reserve ``size`` bytes (page-rounded); returns their GPA."""
        size = -(-size // PAGE_SIZE) * PAGE_SIZE
        if self.next + size > self.limit:
            raise VmmError(
                f"guest memory too small: need {self.next + size:#x} bytes in slot 0 for page tables "
                f"and stacks, have {self.limit:#x}"
            )
        gpa, self.next = self.next, self.next + size
        return gpa


class PageTables:
    """4-level identity page tables, 4K or 2M leaves, written to guest memory in bulk."""

    def __init__(self, alloc: PageAllocator) -> None:
        self.alloc = alloc
        self.tables: dict[int, array] = {}
        self.root = self._new()

    def _new(self) -> int:
        gpa = self.alloc.alloc(PAGE_SIZE)
        self.tables[gpa] = array("Q", bytes(PAGE_SIZE))
        return gpa

    def _child(self, table: int, index: int) -> int:
        entry = self.tables[table][index]
        if not entry:
            child = self._new()
            self.tables[table][index] = child | PTE_PRESENT | PTE_WRITE
            return child
        if entry & PTE_LARGE:
            raise VmmError(f"page table conflict at index {index}: already a large page")
        return entry & ~0xFFF

    def map(self, gpa: int, size: int, page_size: int = HUGE_PAGE_SIZE) -> None:
        """Identity-map [gpa, gpa+size): 2M leaves where aligned (if page_size is 2M), else 4K."""
        end = gpa + size
        addr = gpa
        while addr < end:
            pml4 = (addr >> 39) & 511
            pdpt = self._child(self.root, pml4)
            pd = self._child(pdpt, (addr >> 30) & 511)
            chunk = addr & ~(HUGE_PAGE_SIZE - 1)
            pd_index = (addr >> 21) & 511
            if page_size == HUGE_PAGE_SIZE and addr == chunk and addr + HUGE_PAGE_SIZE <= end:
                self.tables[pd][pd_index] = addr | PTE_PRESENT | PTE_WRITE | PTE_LARGE
                addr += HUGE_PAGE_SIZE
                continue
            pt = self._child(pd, pd_index)
            stop = min(end, chunk + HUGE_PAGE_SIZE)
            first = (addr >> 12) & 511
            n = (stop - addr) // PAGE_SIZE
            flags = PTE_PRESENT | PTE_WRITE
            self.tables[pt][first : first + n] = array("Q", range(addr | flags, stop | flags, PAGE_SIZE))
            addr = stop

    def write(self) -> None:
        """Store every table into guest memory."""
        for gpa, table in self.tables.items():
            self.alloc.memory.write(gpa, table.tobytes())


def _gdt() -> bytes:
    """Null, 64-bit code, data, and a 16-byte 64-bit TSS descriptor (base TSS_GPA)."""
    tss_limit = 0x67
    tss_low = (tss_limit & 0xFFFF) | ((TSS_GPA & 0xFFFFFF) << 16) | (0x89 << 40) | (((TSS_GPA >> 24) & 0xFF) << 56)
    return struct.pack("<QQQQQ", 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, tss_low, TSS_GPA >> 32)


def _segment(selector: int, type_: int, *, code: bool = False, system: bool = False) -> uapi.kvm_segment:
    return uapi.kvm_segment(
        base=0,
        limit=0xFFFFFFFF,
        selector=selector,
        type=type_,
        present=1,
        dpl=0,
        db=0 if code else 1,
        s=0 if system else 1,
        l=1 if code else 0,
        g=1,
    )


def setup_long_mode_tables(
    memory: GuestMemory, alloc: PageAllocator, page_size: int, ranges: Iterable[tuple[int, int]]
) -> PageTables:
    """Write the GDT and identity page tables for ``ranges``; returns the tables (root = CR3)."""
    memory.write(GDT_GPA, _gdt())
    tables = PageTables(alloc)
    for gpa, size in ranges:
        tables.map(gpa, size, page_size)
    tables.write()
    return tables


def enter_long_mode(
    vcpu: Vcpu,
    cr3: int,
    entry: int,
    stack_top: int,
    args: Iterable[int],
    gs_base: int,
    idt: tuple[int, int] | None = None,
) -> None:
    """Put ``vcpu`` in 64-bit mode at ``entry`` with paging on CR3, the given argument registers,
    GS.base at ``gs_base`` (its ucall block) and, when given, the IDT (base, limit)."""
    s = vcpu.get_sregs()
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    s.efer = EFER_LME | EFER_LMA
    s.cr3 = cr3
    s.cs = _segment(SEL_CODE, 11, code=True)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(s, name, _segment(SEL_DATA, 3))
    s.gs.base = gs_base
    tr = _segment(SEL_TSS, 11, system=True)
    tr.base, tr.limit, tr.g = TSS_GPA, 0x67, 0
    s.tr = tr
    s.gdt.base, s.gdt.limit = GDT_GPA, len(_gdt()) - 1
    if idt is not None:
        s.idt.base, s.idt.limit = idt
    vcpu.set_sregs(s)
    _set_entry_regs(vcpu, entry, stack_top, args)


def enter_real_mode(vcpu: Vcpu, entry: int, stack_top: int, args: Iterable[int], gs_base: int) -> None:
    """Put ``vcpu`` in 16-bit real mode with segments at 0, so addresses are physical, except GS,
    whose selector points at ``gs_base`` (its ucall block; 16-byte aligned)."""
    s = vcpu.get_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        seg = getattr(s, name)
        seg.base, seg.selector = 0, 0
    s.gs.base, s.gs.selector = gs_base, gs_base >> 4
    vcpu.set_sregs(s)
    _set_entry_regs(vcpu, entry, stack_top, args)


ARG_REGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")


def _set_entry_regs(vcpu: Vcpu, entry: int, stack_top: int, args: Iterable[int]) -> None:
    regs = uapi.kvm_regs(rip=entry, rsp=stack_top, rflags=0x2)
    for name, value in zip(ARG_REGS, args):
        setattr(regs, name, value)
    vcpu.set_regs(regs)
