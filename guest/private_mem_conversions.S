/* vmm-guest: mode=long vcpus=1 description="port of the kernel's private_mem_conversions_test: MAP_GPA_RANGE conversions and PUNCH_HOLE" */
/*
 * rcx = base of the data (4 GiB in the test); vCPU n works on [base + n*4M, +2M+4K).
 * Each step converts with the KVM_HC_MAP_GPA_RANGE hypercall, then asks the host (SYNC) to check
 * that it sees only shared data; the guest checks its private data itself.
 *
 * SYNC args: SYNC_SHARED/PRIVATE gpa size pattern new_pattern through_private
 *   the host expects `pattern` in its (shared) view of [gpa, +size), or zeros when the data went
 *   through a private period and the host's policy discarded the shared side meanwhile; for
 *   SYNC_SHARED it then writes new_pattern.
 * SYNC_POLICY n: pass n is about to start (0: attributes only, 1: discard + fallocate)
 * SYNC_PUNCH gpa size: the host punches the guest_memfd there without changing attributes
 */
#include <vmm.h>

#define PAGE            0x1000
#define DATA_SIZE       (0x200000 + PAGE)
#define DATA_STRIDE     0x400000
#define SYNC_SHARED     0
#define SYNC_PRIVATE    1
#define SYNC_POLICY     2
#define SYNC_PUNCH      3
#define NR_RANGES       5
#define ENCRYPTED       0x10    /* KVM_MAP_GPA_RANGE_ENCRYPTED: to private */

GUEST_ENTRY
    mov %rdi, %rax
    imul $DATA_STRIDE, %rax
    add %rcx, %rax
    mov %rax, %r12                          /* r12 = base of this vCPU's data */
    GUEST_SYNC_ARGS($SYNC_POLICY, $0)
    call explicit_conversion
    GUEST_SYNC_ARGS($SYNC_POLICY, $1)
    call explicit_conversion
    xor %ebp, %ebp
    call punch_hole_test                    /* whole range faulted in */
    mov $1, %ebp
    call punch_hole_test                    /* only the target range faulted in */
    GUEST_DONE()

/* memset(rdi = gpa, rsi = byte, rdx = size); preserves every register */
memset:
    push %rdi
    push %rcx
    push %rax
    mov %rsi, %rax
    mov %rdx, %rcx
    rep stosb
    pop %rax
    pop %rcx
    pop %rdi
    ret

/* check(rdi = gpa, rsi = byte, rdx = size): every byte equals rsi (memcmp_g); preserves registers */
check:
    push %rdi
    push %rcx
    push %rax
    push %rbx
    mov %rsi, %rax
    mov %rdx, %rcx
    test %rcx, %rcx
    jz 1f
    repe scasb
    je 1f
    movzbq -1(%rdi), %rbx
    GUEST_ASSERT_EQ(%rbx, %rax)             /* the first byte that differs, against the pattern */
1:  pop %rbx
    pop %rax
    pop %rcx
    pop %rdi
    ret

/* map(rdi = gpa, rsi = size, rdx = 1: private / 0: shared) via KVM_HC_MAP_GPA_RANGE */
map:
    push %rbx
    push %rcx
    push %rdx
    mov $KVM_HC_MAP_GPA_RANGE, %eax
    mov %rdi, %rbx
    mov %rsi, %rcx
    shr $12, %rcx
    neg %rdx
    and $ENCRYPTED, %rdx
    GUEST_HYPERCALL
    GUEST_ASSERT_EQ(%rax, $0)
    pop %rdx
    pop %rcx
    pop %rbx
    ret

explicit_conversion:
    mov %r12, %rdi
    mov $0xaa, %esi
    mov $DATA_SIZE, %edx
    call memset
    call check                              /* memory is shared by default */
    GUEST_SYNC_ARGS($SYNC_SHARED, %r12, $DATA_SIZE, $0xaa, $0xcc, $0)
    mov $0xcc, %esi
    call check
    xor %r13, %r13                          /* r13 = range index */
next_range:
    mov %r13, %rax
    shl $4, %rax
    mov ranges(%rax), %r14
    add %r12, %r14                          /* r14 = gpa */
    mov ranges+8(%rax), %r15                /* r15 = size */
    mov %r14, %rdi
    mov $0x11, %esi
    mov %r15, %rdx
    call memset                             /* p1 */
    mov $1, %edx
    mov %r15, %rsi
    call map                                /* to private */
    mov $0x22, %esi
    cmp $PAGE, %r15
    jbe small_range
    mov $PAGE, %edx
    call memset                             /* p2 in the first page only */
    jmp back_to_shared
small_range:
    mov %r15, %rdx
    call memset                             /* p2 */
    GUEST_SYNC_ARGS($SYNC_PRIVATE, %r14, %r15, $0x11, $0, $1)
    call check                              /* private data is p2 */
    mov %r12, %rdi                          /* shared data before and after still holds init_p */
    mov $0xcc, %esi
    mov %r14, %rdx
    sub %r12, %rdx
    call check
    lea (%r14,%r15), %rdi
    lea DATA_SIZE(%r12), %rdx
    sub %rdi, %rdx
    call check
    xor %ebx, %ebx                          /* rbx = offset of a page in the range */
odd_pages:
    lea (%r14,%rbx), %rdi
    test $PAGE, %rbx
    jz even_page
    mov $PAGE, %esi
    xor %edx, %edx
    call map                                /* odd pages back to shared */
    GUEST_SYNC_ARGS($SYNC_SHARED, %rdi, $PAGE, $0x11, $0x33, $1)
    mov $0x33, %esi
    mov $PAGE, %edx
    call check
    jmp next_page
even_page:
    GUEST_SYNC_ARGS($SYNC_PRIVATE, %rdi, $PAGE, $0x11, $0, $1)
next_page:
    add $PAGE, %rbx
    cmp %r15, %rbx
    jb odd_pages
back_to_shared:
    mov %r14, %rdi
    mov %r15, %rsi
    xor %edx, %edx
    call map                                /* the whole range back to shared */
    mov $0x33, %esi
    mov %r15, %rdx
    call memset
    GUEST_SYNC_ARGS($SYNC_SHARED, %r14, %r15, $0x33, $0x44, $0)
    mov $0x44, %esi
    call check
    mov $0xcc, %esi
    call memset                             /* reset to init_p */
    mov %r12, %rdi
    mov $DATA_SIZE, %esi
    xor %edx, %edx
    call map
    GUEST_SYNC_ARGS($SYNC_PUNCH, %r12, $DATA_SIZE)   /* free all private memory */
    inc %r13
    cmp $NR_RANGES, %r13
    jb next_range
    ret

punch_hole_test:
    mov %r12, %rdi
    mov $DATA_SIZE, %esi
    mov $1, %edx
    call map                                /* everything private */
    xor %r13, %r13
punch_range:
    mov %r13, %rax
    shl $4, %rax
    mov ranges(%rax), %r14
    add %r12, %r14
    mov ranges+8(%rax), %r15
    GUEST_SYNC_ARGS($SYNC_PUNCH, %r12, $DATA_SIZE)
    mov $0xcc, %esi
    test %ebp, %ebp
    jz punch_whole
    mov %r14, %rdi
    mov %r15, %rdx
    jmp punch_fill
punch_whole:
    mov %r12, %rdi
    mov $DATA_SIZE, %edx
punch_fill:
    call memset                             /* fault in and initialise */
    call check
    GUEST_SYNC_ARGS($SYNC_PUNCH, %r14, %r15)
    mov %r14, %rdi
    xor %esi, %esi
    mov %r15, %rdx
    call check                              /* punched private memory reads back as zeros */
    inc %r13
    cmp $NR_RANGES, %r13
    jb punch_range
    ret

    .section .rodata
    .balign 16
ranges:                                     /* {offset, size} as in test_ranges[] */
    .quad 0, PAGE
    .quad 0, 0x200000
    .quad PAGE, PAGE
    .quad PAGE, 0x200000
    .quad 0x200000, PAGE
