/* vmm-guest: mode=long vcpus=1 vm=sw_protected description="conversion benchmark: converts [rcx, +size) to private then back to shared in unit steps with MAP_GPA_RANGE (size, unit: two u64 the host writes at rdx)" */
/*
 * The guest side of `vmm bench conversions` (vmm/tools/bench/conversions.py).
 *
 * rcx = base GPA of a private-capable region (memfd + guest_memfd);
 * rdx = first free GPA in slot 0, where the host wrote two u64: size, then unit (both multiples
 * of 4K, size a multiple of unit).
 *
 * One KVM_HC_MAP_GPA_RANGE hypercall per unit (rbx = gpa, rcx = unit / 4K pages, rdx = attrs:
 * ENCRYPTED for private, plus the PAGE_SZ_2M hint when unit is 2M); each must return 0.
 * [base, base + size) goes to private, GUEST_SYNC(1), back to shared, GUEST_SYNC(2), GUEST_DONE().
 * The guest never touches the data, so only the conversions themselves are measured.
 */
#include <vmm.h>

#define PAGE_SHIFT  12
#define HUGE_2M     0x200000
#define ENCRYPTED   0x10        /* KVM_MAP_GPA_RANGE_ENCRYPTED */
#define PAGE_SZ_2M  0x1         /* KVM_MAP_GPA_RANGE_PAGE_SZ_2M */

GUEST_ENTRY
    mov %rcx, %r12                          /* r12 = base */
    mov (%rdx), %r13                        /* r13 = size */
    mov 8(%rdx), %r14                       /* r14 = unit */
    xor %r15, %r15                          /* r15 = page-size hint */
    cmp $HUGE_2M, %r14
    jne 1f
    mov $PAGE_SZ_2M, %r15
1:  mov %r15, %rbp
    or $ENCRYPTED, %rbp
    call sweep                              /* to private */
    GUEST_SYNC(1)
    mov %r15, %rbp
    call sweep                              /* back to shared */
    GUEST_SYNC(2)
    GUEST_DONE()

/* sweep: MAP_GPA_RANGE(gpa, unit >> 12, rbp) for gpa = r12, r12 + r14, ... below r12 + r13 */
sweep:
    mov %r12, %rsi                          /* rsi = gpa */
    lea (%r12,%r13), %rdi                   /* rdi = end */
    mov %r14, %r8
    shr $PAGE_SHIFT, %r8                    /* r8 = pages per hypercall */
2:  cmp %rdi, %rsi
    jae 3f
    mov $KVM_HC_MAP_GPA_RANGE, %eax
    mov %rsi, %rbx
    mov %r8, %rcx
    mov %rbp, %rdx
    GUEST_HYPERCALL
    GUEST_ASSERT_EQ(%rax, $0)
    add %r14, %rsi
    jmp 2b
3:  ret
