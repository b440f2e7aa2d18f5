/* vmm-guest: mode=real vcpus=1 description="real mode: raises the exception ecx selects (0 #UD, 1 #DE, 3 #BP): the report names it" */
#define VMM_REAL_MODE
#include <vmm.h>

    .code16
GUEST_ENTRY
    cmp $0, %ecx
    je undefined
    cmp $1, %ecx
    je divide
    cmp $3, %ecx
    je breakpoint
    GUEST_FAIL("unknown exception selector in ecx")

undefined:
    ud2
divide:
    xor %dx, %dx
    xor %cx, %cx
    mov $1, %ax
    div %cx
breakpoint:
    int3
