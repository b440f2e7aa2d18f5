/* vmm-guest: mode=long vcpus=1 description="exit benchmark: rcx x GUEST_SYNC2(1, i) then GUEST_DONE" */
#include <vmm.h>

/*
 * The guest side of `vmm bench exits` (vmm/bench.py) and bench/exit_loop.c: both VMMs run this
 * same binary, so they handle the same exits. Each iteration is one PIO ucall exit (SYNC with
 * stage 1 and the iteration number i = 0, 1, ..., rcx - 1); the final DONE is one more.
 */
GUEST_ENTRY
    xor %rbx, %rbx
    test %rcx, %rcx
    jz 2f
1:  GUEST_SYNC2(1, %rbx)
    inc %rbx
    cmp %rcx, %rbx
    jb 1b
2:  GUEST_DONE()
