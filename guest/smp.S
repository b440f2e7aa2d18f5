/* vmm-guest: mode=long vcpus=4 description="every vCPU counts to 100000 in its own cache line, then syncs its id" */
#include <vmm.h>

GUEST_ENTRY
    /* counter of vCPU n at rdx + 64*n */
    mov %rdi, %rbx
    shl $6, %rbx
    add %rdx, %rbx
    mov $100000, %rcx
1:  incq (%rbx)
    loop 1b
    mov (%rbx), %rax
    GUEST_ASSERT_EQ(%rax, $100000)
    GUEST_SYNC2(1, %rdi)
    GUEST_DONE()
