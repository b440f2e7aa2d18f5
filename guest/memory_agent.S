/* vmm-guest: mode=long vcpus=2 vm=sw_protected description="runs memory commands the host leaves in its mailbox: write, check, map (for property tests)" */
/*
 * Mailbox of vCPU n: 32 bytes at rdx + 64*n: {op, gpa, size, value}.
 * Loop: GUEST_SYNC_ARGS($1, result, found) -> the host reads the result of the last command and
 * leaves the next one; then the guest runs it.
 *   op 0: DONE
 *   op 1: WRITE  fill [gpa, +size) with the byte `value`; result 0
 *   op 2: CHECK  every byte of [gpa, +size) equals `value`; result 0, or 1 + offset of the first
 *                byte that differs (and found = that byte)
 *   op 3: MAP    KVM_HC_MAP_GPA_RANGE(gpa, size / 4K, value ? ENCRYPTED : 0); result = its ret
 */
#include <vmm.h>

GUEST_ENTRY
    mov %rdi, %r12
    shl $6, %r12
    add %rdx, %r12                  /* r12 = mailbox */
    xor %r13, %r13                  /* r13 = result */
    xor %r14, %r14                  /* r14 = found */
next_command:
    GUEST_SYNC_ARGS($1, %r13, %r14)
    xor %r13, %r13
    xor %r14, %r14
    mov 0(%r12), %rax
    mov 8(%r12), %rdi
    mov 16(%r12), %rcx
    mov 24(%r12), %rsi
    cmp $1, %rax
    je do_write
    cmp $2, %rax
    je do_check
    cmp $3, %rax
    je do_map
    GUEST_DONE()
    GUEST_FAIL("command after DONE")

do_write:
    mov %rsi, %rax
    rep stosb
    jmp next_command

do_check:
    mov %rdi, %rbx
    mov %rsi, %rax
    repe scasb
    je next_command
    mov %rdi, %r13
    sub %rbx, %r13                  /* 1 + offset of the differing byte */
    movzbq -1(%rdi), %r14
    jmp next_command

do_map:
    mov %rdi, %rbx
    shr $12, %rcx
    xor %edx, %edx
    test %rsi, %rsi
    jz 1f
    mov $0x10, %edx                 /* KVM_MAP_GPA_RANGE_ENCRYPTED */
1:  mov $KVM_HC_MAP_GPA_RANGE, %eax
    GUEST_HYPERCALL
    mov %rax, %r13
    jmp next_command
