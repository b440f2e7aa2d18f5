/* vmm-guest: mode=real vcpus=1 description="16-bit real-mode guest: checks CR0.PE=0, prints, syncs its vCPU id" */
#define VMM_REAL_MODE
#include <vmm.h>

    .code16
GUEST_ENTRY
    GUEST_PRINT("hello from real mode")
    mov %cr0, %eax
    and $1, %eax
    GUEST_ASSERT_EQ(%eax, $0)
    GUEST_SYNC2(1, %edi)
    /* segment arithmetic: 0x1000:0x0010 and 0x1001:0x0000 are both linear 0x10010 */
    mov $0x1000, %ax
    mov %ax, %es
    movl $0xfeedf00d, %es:0x10
    mov $0x1001, %ax
    mov %ax, %fs
    mov %fs:0, %ebx
    xor %ax, %ax
    mov %ax, %es
    mov %ax, %fs
    GUEST_ASSERT_EQ(%ebx, $0xfeedf00d)
    GUEST_DONE()
