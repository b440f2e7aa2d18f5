/* vmm-guest: mode=long vcpus=1 description="raises the CPU exception rcx selects (0 #UD, 1 #DE, 2 #PF, 3 #BP, 4 #GP, 5 #UD under a broken IDT, 6 #MC from the host): the report names it" */
#include <vmm.h>

#define UNMAPPED_GPA 0x40000000000      /* 4 TiB: no memslot, so no page table maps it */
#define NON_CANONICAL 0x8000000000000000

GUEST_ENTRY
    cmp $0, %rcx
    je undefined
    cmp $1, %rcx
    je divide
    cmp $2, %rcx
    je page_fault
    cmp $3, %rcx
    je breakpoint
    cmp $4, %rcx
    je general_protection
    cmp $5, %rcx
    je broken_idt
    cmp $6, %rcx
    je machine_check
    GUEST_FAIL("unknown exception selector in rcx")

undefined:
    ud2
divide:
    xor %edx, %edx
    xor %ecx, %ecx
    mov $1, %eax
    div %ecx
page_fault:
    movabs $UNMAPPED_GPA, %rax
    movq $1, (%rax)
breakpoint:
    int3
general_protection:
    movabs $NON_CANONICAL, %rax
    mov (%rax), %rax
broken_idt:
    lidt null_idt                   /* limit 0: #UD cannot be delivered, nor the #GP, nor the #DF */
    ud2
machine_check:
    mov %cr4, %rax
    or $0x40, %rax                  /* CR4.MCE: without it an injected #MC is a triple fault */
    mov %rax, %cr4
    GUEST_SYNC(1)                   /* the host injects the #MC (KVM_X86_SET_MCE) before it resumes us */
    nop
    GUEST_FAIL("no #MC arrived")

    .section .rodata
    .balign 8
null_idt:
    .word 0
    .quad 0
