/* vmm-guest: mode=long vcpus=4 description="touches every page of its per-vCPU region and checks its contents (demand_paging_test.c's memstress guest)" */
#include <vmm.h>

/*
 * The guest of the kernel's demand_paging_test.c (memstress_guest_code: touch every page of this
 * vCPU's region once), plus a check of every page it touches: the u64s at offsets 0 and 0xff8 of
 * a page at GPA a must hold a ^ seed and (a + 0xff8) ^ seed (the host's page source is built so).
 *
 * rcx = GPA of a parameter block (u64s) in shared memory the host wrote:
 *   0 base, 8 bytes per vCPU, 16 seed, 24 mode, 32 write (store each checked u64 back, as
 *   memstress writes), 40 check (0: touch without checking, for any page source), 48 overlap
 *   (every vCPU touches the first region, as demand_paging_test -o),
 *   64 + 16 * id: this vCPU's command {gpa, npages} (mode 1 only).
 * mode 0, SWEEP: touch [base + id * bytes, + bytes), SYNC(1, pages touched), DONE.
 * mode 1, COMMANDS: SYNC(2), then touch the command's pages; npages 0 ends with DONE.
 * mode 2, OUTS: `rep outsb` of 16 bytes from base to port 0x2000 (KVM's emulator reads the
 *   memory, not the guest), then SYNC(3, u64 at base as the guest reads it), DONE.
 * mode 3, CALL: call the code at base (a non-present page the guest executes), SYNC(4, rax), DONE.
 */
#define PAGE        0x1000
#define LAST_U64    0xff8
#define OUTS_PORT   0x2000

GUEST_ENTRY
    mov %rcx, %rbx                  /* rbx = parameter block */
    mov %rdi, %r12                  /* r12 = vCPU id */
    mov 16(%rbx), %r13              /* r13 = seed */
    mov 32(%rbx), %r14              /* r14 = write flag */
    mov 40(%rbx), %rbp              /* rbp = check flag */
    mov 24(%rbx), %rax
    cmp $1, %rax
    je commands
    cmp $2, %rax
    je outs
    cmp $3, %rax
    je call_page

    mov 8(%rbx), %rsi
    mov %r12, %rax
    cmpq $0, 48(%rbx)
    je 7f
    xor %eax, %eax
7:  imul %rsi, %rax
    add (%rbx), %rax
    mov %rax, %rdi                  /* rdi = start */
    add %rax, %rsi                  /* rsi = end */
    call touch
    GUEST_SYNC2(1, %r15)
    GUEST_DONE()

commands:
    mov %r12, %r8
    shl $4, %r8
    lea 64(%rbx,%r8), %r8           /* r8 = this vCPU's command */
1:  GUEST_SYNC(2)
    mov 8(%r8), %rsi
    test %rsi, %rsi
    jz 2f
    mov (%r8), %rdi
    shl $12, %rsi
    add %rdi, %rsi
    call touch
    jmp 1b
2:  GUEST_DONE()

outs:
    mov (%rbx), %rsi
    mov $16, %rcx
    mov $OUTS_PORT, %dx
    cld
    rep outsb
    mov (%rbx), %rdi
    mov (%rdi), %rax
    GUEST_SYNC2(3, %rax)
    GUEST_DONE()

call_page:
    mov (%rbx), %rax
    call *%rax
    GUEST_SYNC2(4, %rax)
    GUEST_DONE()

/* check (and with r14 set, store back) [rdi, rsi) page by page; r15 = pages touched */
touch:
    xor %r15, %r15
    cmp %rsi, %rdi
    jae 6f
3:  mov (%rdi), %rax
    test %rbp, %rbp
    jz 5f
    mov %rdi, %rdx
    xor %r13, %rdx
    GUEST_ASSERT_EQ(%rax, %rdx)
    lea LAST_U64(%rdi), %rcx
    mov (%rcx), %rdx
    xor %r13, %rcx
    GUEST_ASSERT_EQ(%rdx, %rcx)
5:  test %r14, %r14
    jz 4f
    mov %rax, (%rdi)
4:  inc %r15
    add $PAGE, %rdi
    cmp %rsi, %rdi
    jb 3b
6:  ret
