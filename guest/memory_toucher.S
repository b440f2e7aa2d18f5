/* vmm-guest: mode=long vcpus=1 description="touches [base, +size) every stride bytes in passes, counting pages touched per vCPU; SYNCs each pass's sum, or loops until the host sets stop (params at rdx)" */
#include <vmm.h>

/*
 * The guest of `vmm bench memslots` and of the huge-page and memslot-vs-attributes tests
 * (vmm/tools/bench/memslots.py, selftests/harness/test_memslots_vs_attributes.py). The host
 * writes a parameter block at rdx (the first free GPA of slot 0, which it can read back):
 *
 *   +0  base     first GPA to touch        +24 flags    bit 0: store (else load only)
 *   +8  size     bytes from base                        bit 1: loop until stop (no SYNC per pass)
 *   +16 stride   bytes between touches     +32 stop     the host sets it to 1 to end the run
 *   +64 + 8*id   this vCPU's progress counter: touches so far (the host reads it to see a stall)
 *
 * Without bit 1: after each pass SYNC(1, sum of the u64s loaded at each touch), then another
 * pass when the host re-enters. With bit 1: passes until stop, then DONE.
 */
#define P_BASE   0
#define P_SIZE   8
#define P_STRIDE 16
#define P_FLAGS  24
#define P_STOP   32
#define P_COUNT  64
#define F_STORE  1
#define F_LOOP   2

GUEST_ENTRY
    mov %rdx, %rbx                      /* the parameter block */
    lea P_COUNT(%rbx,%rdi,8), %r12      /* this vCPU's counter */
pass:
    mov P_BASE(%rbx), %rsi
    mov P_SIZE(%rbx), %rcx
    add %rsi, %rcx                      /* end */
    mov P_STRIDE(%rbx), %r9
    xor %r10, %r10                      /* sum of what was loaded */
touch:
    mov (%rsi), %rax
    add %rax, %r10
    testq $F_STORE, P_FLAGS(%rbx)
    jz 1f
    mov %r10, (%rsi)
1:  incq (%r12)
    add %r9, %rsi
    cmp %rcx, %rsi
    jb touch
    testq $F_LOOP, P_FLAGS(%rbx)
    jnz 2f
    GUEST_SYNC2(1, %r10)
    jmp pass
2:  cmpq $0, P_STOP(%rbx)
    je pass
    GUEST_DONE()
