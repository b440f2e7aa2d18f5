/* vmm-guest: mode=long vcpus=1 description="pre_fault_memory_test's guest: reads every page of the pre-faulted range" */
#include <vmm.h>

/*
 * The kernel's pre_fault_memory_test.c guest_code(base_gpa), checking what it reads.
 * rcx = base GPA (2M aligned) | 1 if the range is private.
 * For each of the TEST_NPAGES pages: load the u64 at its start and assert it is the page's GPA
 * (shared: the host wrote it) or 0 (private: a fresh guest_memfd page), then store the page's
 * GPA inverted there, for the host to see. Then GUEST_DONE.
 */
#define PAGE            0x1000
#define TEST_NPAGES     (0x200000 / PAGE + 1)   /* TEST_SIZE = SZ_2M + PAGE_SIZE */

GUEST_ENTRY
    mov %rcx, %r12
    and $~0xfff, %r12                       /* r12 = base */
    mov %rcx, %r13
    and $1, %r13                            /* r13 = private */
    mov %r12, %rdi
    mov $TEST_NPAGES, %ecx
page:
    mov %rdi, %rbx                          /* expected: the page's GPA ... */
    test %r13, %r13
    jz 1f
    xor %ebx, %ebx                          /* ... or 0 when private */
1:  mov (%rdi), %rax
    GUEST_ASSERT_EQ(%rax, %rbx)
    mov %rdi, %rax
    not %rax
    mov %rax, (%rdi)
    add $PAGE, %rdi
    dec %ecx
    jnz page
    GUEST_DONE()
