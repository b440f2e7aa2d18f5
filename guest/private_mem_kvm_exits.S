/* vmm-guest: mode=long vcpus=1 description="private_mem_kvm_exits_test's guest_repeatedly_read(), and a load/store hammer for conversion races" */
#include <vmm.h>

/*
 * rcx = GPA (page aligned) | mode in bits 0-1 | page count in bits 2-11 (hammer only).
 *
 * mode 0, READ_LOOP: the kernel's guest_repeatedly_read(). Reads the u64 at the GPA once and
 *   reports it, SYNC(1, value), then reads it forever (the host deletes the memslot under it, or
 *   the access never succeeds at all because the GPA is private without a guest_memfd).
 *
 * mode 1, HAMMER: pages [gpa, gpa + n*4K); the u64s at offsets 0 and 0xff8 of each page hold
 *   their own GPA. The guest stores them (SYNC(1, n) when done), then loops: load each, assert it
 *   still holds its GPA, store it back; after every round it checks the u64 at rdx (first free
 *   GPA of slot 0, shared) and stops when the host made it non-zero: SYNC(2, rounds), DONE.
 *   Meant to run while the host converts the pages back and forth without discarding, so that
 *   both the shared and the private copy hold the pattern and every access must see it.
 */
#define PAGE            0x1000
#define LAST_U64        0xff8
#define MODE_MASK       3
#define MODE_HAMMER     1

GUEST_ENTRY
    mov %rcx, %rax
    and $MODE_MASK, %eax
    cmp $MODE_HAMMER, %eax
    je hammer

read_loop:
    mov (%rcx), %rax
    GUEST_SYNC2(1, %rax)
1:  mov (%rcx), %rax
    jmp 1b

hammer:
    mov %rcx, %r13
    shr $2, %r13
    and $0x3ff, %r13                        /* r13 = page count */
    mov %rcx, %r12
    and $~0xfff, %r12                       /* r12 = base */
    mov %rdx, %r14                          /* r14 = stop flag */
    xor %r15, %r15                          /* r15 = rounds */
    mov %r13, %rbx
    shl $12, %rbx
    add %r12, %rbx                          /* rbx = end */
    mov %r12, %rdi
fill:
    mov %rdi, (%rdi)
    lea LAST_U64(%rdi), %rsi
    mov %rsi, (%rsi)
    add $PAGE, %rdi
    cmp %rbx, %rdi
    jb fill
    GUEST_SYNC2(1, %r13)
round:
    mov %r12, %rdi
touch:
    mov (%rdi), %rax
    GUEST_ASSERT_EQ(%rax, %rdi)
    mov %rdi, (%rdi)
    lea LAST_U64(%rdi), %rsi
    mov (%rsi), %rax
    GUEST_ASSERT_EQ(%rax, %rsi)
    mov %rsi, (%rsi)
    add $PAGE, %rdi
    cmp %rbx, %rdi
    jb touch
    inc %r15
    cmpq $0, (%r14)
    je round
    GUEST_SYNC2(2, %r15)
    GUEST_DONE()
