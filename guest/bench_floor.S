/* vmm-guest: mode=long vcpus=1 description="exit floor: rcx bare OUTs to the ucall port (no ucall block), then HLT" */
#include <vmm.h>

/*
 * The physical floor of `vmm bench exits` (bench/exit_loop.c --floor): the cheapest exit a guest
 * can make, one `outb` per iteration and nothing stored, so every other figure is shown against it.
 */
GUEST_ENTRY
    test %rcx, %rcx
    jz 2f
1:  outb %al, $UCALL_PORT
    dec %rcx
    jnz 1b
2:  hlt
