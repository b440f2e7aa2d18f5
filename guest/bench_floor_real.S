/* vmm-guest: mode=real vcpus=1 description="exit floor in real mode: ecx bare OUTs to the ucall port, then HLT" */
#define VMM_REAL_MODE
#include <vmm.h>

/* bench_floor.S in 16-bit real mode (bench/exit_loop.c --real --floor) */
GUEST_ENTRY
.code16
    test %ecx, %ecx
    jz 2f
1:  outb %al, $UCALL_PORT
    dec %ecx
    jnz 1b
2:  hlt
