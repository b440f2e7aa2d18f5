/* vmm-guest: mode=long vcpus=1 description="64-bit guest: checks EFER.LMA, CR0.PG, CR4.PAE and reports its page size" */
#include <vmm.h>

#define MSR_EFER 0xc0000080

GUEST_ENTRY
    mov $MSR_EFER, %ecx
    rdmsr
    and $0x400, %eax                /* EFER.LMA */
    GUEST_ASSERT_EQ(%rax, $0x400)
    mov %cr0, %rax
    shr $31, %rax                   /* CR0.PG */
    GUEST_ASSERT_EQ(%rax, $1)
    mov %cr4, %rax
    and $0x20, %rax                 /* CR4.PAE */
    GUEST_ASSERT_EQ(%rax, $0x20)
    /* walk our own page tables for the address of _start: sync the leaf level (1 = 4K, 2 = 2M) */
    mov %cr3, %rbx
    mov $_start, %rsi
    mov %rsi, %rax
    shr $39, %rax
    and $511, %rax
    mov (%rbx,%rax,8), %rbx         /* PML4E */
    and $~0xfff, %rbx
    mov %rsi, %rax
    shr $30, %rax
    and $511, %rax
    mov (%rbx,%rax,8), %rbx         /* PDPTE */
    and $~0xfff, %rbx
    mov %rsi, %rax
    shr $21, %rax
    and $511, %rax
    mov (%rbx,%rax,8), %rbx         /* PDE */
    mov $1, %rcx
    test $0x80, %rbx                /* PS: a 2M leaf */
    jz 1f
    mov $2, %rcx
1:  GUEST_SYNC2(1, %rcx)
    GUEST_SYNC2(2, %rdi)
    GUEST_DONE()
