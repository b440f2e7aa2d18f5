/* vmm-guest: mode=long vcpus=1 description="default guest: prints, checks memory, syncs, done" */
#include <vmm.h>

GUEST_ENTRY
    GUEST_PRINT("hello from a long-mode guest")
    /* fill 64 KiB of free memory (rdx) with a pattern and sum it back */
    mov %rdx, %rbx
    mov $8192, %rcx
    mov $0x5a5a5a5a5a5a5a5a, %rax
1:  mov %rax, (%rbx)
    add $8, %rbx
    loop 1b
    mov %rdx, %rbx
    mov $8192, %rcx
    xor %r9, %r9
2:  add (%rbx), %r9
    add $8, %rbx
    loop 2b
    mov $0x5a5a5a5a5a5a5a5a, %rax
    imul $8192, %rax
    GUEST_ASSERT_EQ(%r9, %rax)
    GUEST_SYNC2(1, %rdi)
    GUEST_PRINT("memory check passed")
    GUEST_DONE()
