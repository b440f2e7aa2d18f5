"""Magic addresses and ports of the guest ABI (as Firecracker's arch/x86_64/layout.rs lays out its
VMs). guest/include/vmm.h and guest/guest.ld repeat the ones a guest needs; the harness test
test_guest_layout.py preprocesses vmm.h and checks that the two agree."""

from __future__ import annotations

#: Slot 0 starts at GPA 0 and holds everything below; test data goes in slots of its own.
GDT_GPA = 0x1000
#: The 64-bit TSS the GDT's TSS descriptor points at.
TSS_GPA = 0x2000
#: Long mode: the IDT vmm writes for the guest's exception stubs (vectors 0-31, 16 bytes each).
IDT_GPA = 0x1800
#: Real mode: vCPU n's stack ends at REAL_STACK_TOP - n * REAL_STACK_SIZE.
REAL_STACK_TOP = 0x7000
#: Real mode: bytes of stack per vCPU.
REAL_STACK_SIZE = 0x400
#: Every guest image is linked (guest/guest.ld) and loaded here; execution starts at its first byte.
IMAGE_GPA = 0x8000
#: An image must end below this.
IMAGE_END = 0x100000
#: Long mode: page tables, then per-vCPU stacks, are allocated upward from here in slot 0.
SYSTEM_GPA = 0x100000
#: Long mode: bytes of stack per vCPU.
STACK_SIZE = 0x4000
#: Where tests and `vmm boot` put a guest's data region (private_mem_conversions_test's 4 GiB).
DATA_GPA = 1 << 32

#: An OUT to this port is one ucall (vmm.guest.ucall): below 0x100, so `outb %al, $UCALL_PORT` needs no
#: register (each guest instruction costs ~0.14 us on this host's kvm_pvm; README "Benchmarks").
UCALL_PORT = 0xE0
#: Bytes written with OUT to this port are console text (QEMU's debugcon port).
DEBUGCON_PORT = 0xE9
#: vCPU n's ucall block is at UCALL_GPA + n * UCALL_SLOT (the guest reaches it through %gs).
UCALL_GPA = 0x3000
#: Bytes per vCPU ucall block: a u32 header, then six u64 argument slots at offset 8.
UCALL_SLOT = 64
#: Header bit: the arguments are u64 (long mode); without it the host reads their low halves (real mode).
UCALL_WIDE = 1 << 16
#: Real-mode vCPUs: their ucall blocks (upward from UCALL_GPA) and stacks (down from REAL_STACK_TOP) meet here.
REAL_MAX_VCPUS = (REAL_STACK_TOP - UCALL_GPA) // (UCALL_SLOT + REAL_STACK_SIZE)
#: Long-mode vCPUs: their ucall blocks fill [UCALL_GPA, REAL_STACK_TOP).
MAX_VCPUS = (REAL_STACK_TOP - UCALL_GPA) // UCALL_SLOT


def ucall_block(vcpu_id: int) -> int:
    """The GPA of vCPU ``vcpu_id``'s ucall block."""
    return UCALL_GPA + vcpu_id * UCALL_SLOT


#: The table by which vmm finds a guest's exception stubs (guest/include/vmm_exceptions.h): this
#: u64, then the stubs' address, then the code size (16 or 64) they were assembled for.
EXC_TABLE_MAGIC = 0x5C3E7A1D9B0F6E42
#: Bytes per exception stub; stub n handles vector n.
EXC_STUB_SIZE = 16
#: Vectors with a stub: the CPU's exceptions, 0-31.
EXC_VECTORS = 32
#: In an exception ucall's args[0]: set when an #MC handler found a bank with MCi_STATUS.VAL.
EXC_BANK_FOUND = 0x10000
