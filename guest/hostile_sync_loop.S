/* vmm-guest: mode=long vcpus=1 description="SYNCs in an endless loop: only a timeout over the whole run ends it" */
#include <vmm.h>

GUEST_ENTRY
    xor %r9, %r9
1:  inc %r9
    GUEST_SYNC2(1, %r9)
    jmp 1b
