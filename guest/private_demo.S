/* vmm-guest: mode=long vcpus=1 vm=sw_protected description="converts 8 MiB of data between shared and private with MAP_GPA_RANGE; the host prints accounting per step" */
/* rcx = base of an 8 MiB private-capable region (vmm boot puts it at 4 GiB). */
#include <vmm.h>

#define MiB         0x100000
#define ENCRYPTED   0x10        /* KVM_MAP_GPA_RANGE_ENCRYPTED */
#define PAGE_SZ_2M  0x1         /* KVM_MAP_GPA_RANGE_PAGE_SZ_2M */

/* fill(gpa, size, byte) with rep stosb */
.macro fill gpa, size, byte
    mov \gpa, %rdi
    mov \size, %rcx
    mov \byte, %eax
    rep stosb
.endm

/* map(gpa, size, attrs) through KVM_HC_MAP_GPA_RANGE; the host must answer 0 */
.macro map gpa, size, attrs
    mov $KVM_HC_MAP_GPA_RANGE, %eax
    mov \gpa, %rbx
    mov \size, %rcx
    shr $12, %rcx
    mov \attrs, %rdx
    GUEST_HYPERCALL
    GUEST_ASSERT_EQ(%rax, $0)
.endm

GUEST_ENTRY
    mov %rcx, %r12
    lea (4 * MiB)(%r12), %r13
    GUEST_PRINT("writing 8 MiB of shared data")
    fill %r12, $(8 * MiB), $0x11
    GUEST_SYNC(1)
    GUEST_PRINT("converting the first 4 MiB to private")
    map %r12, $(4 * MiB), $(ENCRYPTED | PAGE_SZ_2M)
    GUEST_SYNC(2)
    GUEST_PRINT("writing private data")
    fill %r12, $(4 * MiB), $0x22
    GUEST_SYNC(3)
    GUEST_PRINT("converting the other 4 MiB to private and writing it")
    map %r13, $(4 * MiB), $(ENCRYPTED | PAGE_SZ_2M)
    fill %r13, $(4 * MiB), $0x22
    GUEST_SYNC(4)
    GUEST_PRINT("converting everything back to shared")
    map %r12, $(8 * MiB), $PAGE_SZ_2M
    GUEST_SYNC(5)
    GUEST_PRINT("writing shared data again")
    fill %r12, $(8 * MiB), $0x33
    movzbq (%r12), %rax
    GUEST_ASSERT_EQ(%rax, $0x33)
    GUEST_SYNC(6)
    GUEST_DONE()
