/* vmm-guest: mode=long vcpus=4 description="one vCPU (rcx bits 0-7) prints 'failing now' and fails a GUEST_ASSERT_EQ after rcx >> 8 loop turns; the others never finish: odd ids SYNC in a loop, even ids spin without exits" */
#include <vmm.h>

GUEST_ENTRY
    mov %rcx, %rbx
    and $0xff, %rbx
    shr $8, %rcx
    cmp %rbx, %rdi
    je fail
    test $1, %rdi
    jnz sync_loop
spin:
    jmp spin

sync_loop:
    xor %r9, %r9
1:  inc %r9
    GUEST_SYNC2(1, %r9)
    jmp 1b

fail:
    test %rcx, %rcx
    jz 3f
2:  loop 2b                 /* rcx turns of delay, so the others are running when this one fails */
3:  GUEST_PRINT("failing now")  /* the host notes the time: the others must stop soon after */
    mov %rdi, %rax
    GUEST_ASSERT_EQ(%rax, $0x1234)
    GUEST_DONE()
