/* vmm-guest: mode=long vcpus=1 vm=sw_protected description="asks KVM_HC_MAP_GPA_RANGE to make one page of its own stack, image or page tables private; vmm must stop the run and name what lives there" */
/*
 * rcx picks the page the guest asks to make private (one page, KVM_MAP_GPA_RANGE_ENCRYPTED):
 *   0  the page just below the stack pointer: its own stack
 *   1  the page holding _start: its own image
 *   2  the page CR3 points at: the root page table
 *   3  DATA_GPA: test data the host bound to a guest_memfd (a control: converted, answered 0)
 * Then SYNC(1, rax): the hypercall's answer. For 0-2 vmm stops the run at the hypercall, so the
 * host never sees this SYNC; were the page made private, the guest would most likely triple-fault
 * on its own zeroed stack or page table before getting here.
 */
#include <vmm.h>

#define ENCRYPTED   0x10    /* KVM_MAP_GPA_RANGE_ENCRYPTED: to private */

GUEST_ENTRY
    lea -8(%rsp), %rbx                      /* 0: rsp starts one past the stack's top */
    cmp $1, %rcx
    jne 1f
    lea _start(%rip), %rbx
1:  cmp $2, %rcx
    jne 2f
    mov %cr3, %rbx
2:  cmp $3, %rcx
    jne 3f
    mov $DATA_GPA, %rbx
3:  and $-0x1000, %rbx                      /* the page's GPA */
    mov $KVM_HC_MAP_GPA_RANGE, %eax
    mov $1, %ecx                            /* one page */
    mov $ENCRYPTED, %edx
    GUEST_HYPERCALL
    GUEST_SYNC2(1, %rax)
    GUEST_DONE()
