/* vmm-guest: mode=long vcpus=1 description="checks that the page at rcx holds one repeated value, syncs it, then fills the page with its complement" */
#include <vmm.h>

/*
 * rcx = GPA of a page the host filled with one u64 value (the kernel's guest_memfd_test
 * guest_code() checks 0xaa bytes and writes 0xff ones; the host chooses the value here).
 *   SYNC(1, value)     every u64 of the page equals the first one (GUEST_ASSERT_EQ otherwise)
 *   SYNC(2, ~value)    the guest has written ~value to every u64 of the page
 *   DONE
 */
#define PAGE_QWORDS 512

GUEST_ENTRY
    mov (%rcx), %rax
    mov %rcx, %rbx
    mov $PAGE_QWORDS, %r9
1:  GUEST_ASSERT_EQ((%rbx), %rax)
    add $8, %rbx
    dec %r9
    jnz 1b
    GUEST_SYNC2(1, %rax)

    not %rax
    mov %rcx, %rbx
    mov $PAGE_QWORDS, %r9
2:  mov %rax, (%rbx)
    add $8, %rbx
    dec %r9
    jnz 2b
    GUEST_SYNC2(2, %rax)
    GUEST_DONE()
