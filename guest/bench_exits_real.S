/* vmm-guest: mode=real vcpus=1 description="exit benchmark in real mode: ecx x GUEST_SYNC2(1, i) then GUEST_DONE" */
#define VMM_REAL_MODE
#include <vmm.h>

/* bench_exits.S in 16-bit real mode: the same SYNCs, 32-bit argument stores (bench/exit_loop.c --real) */
GUEST_ENTRY
.code16
    xor %ebx, %ebx
    test %ecx, %ecx
    jz 2f
1:  GUEST_SYNC2(1, %ebx)
    inc %ebx
    cmp %ecx, %ebx
    jb 1b
2:  GUEST_DONE()
