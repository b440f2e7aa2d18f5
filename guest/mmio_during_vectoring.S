/* vmm-guest: mode=long vcpus=1 description="set_memory_region_test's guest_code_mmio_during_vectoring: a #GP whose IDT lies in MMIO" */
#include <vmm.h>

/*
 * The kernel's set_memory_region_test.c (6.14+) guest_code_mmio_during_vectoring():
 *   set_idt(&(struct desc_ptr){ .address = MEM_REGION_GPA, .size = 0xFFF });
 *   *((u8 *)NONCANONICAL) = 0x1;      generate a #GP
 *   GUEST_ASSERT(0);
 * rcx = the IDT base (MEM_REGION_GPA: identity-mapped by the host, but no memslot behind it, so
 * reading the #GP gate while delivering the exception is an MMIO access KVM cannot emulate).
 * Should the store ever complete, or the #GP be delivered somewhere, the guest ABORTs.
 */
#define NONCANONICAL    0xaaaaaaaaaaaaaaaa

GUEST_ENTRY
    sub $16, %rsp
    movw $0xfff, (%rsp)                     /* limit */
    mov %rcx, 2(%rsp)                       /* base */
    lidt (%rsp)
    add $16, %rsp
    movabs $NONCANONICAL, %rax
    movb $1, (%rax)                         /* #GP: its delivery reads IDT[13] at base + 13 * 16 */
    GUEST_FAIL("the store to a non-canonical address did not fault")
