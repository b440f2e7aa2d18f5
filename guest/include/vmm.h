/*
 * vmm guest ABI for GNU-as guests (preprocessed with cpp, so use C comments, not '#').
 *
 * Entry: the image is loaded at 0x8000 and starts at its first byte (GUEST_ENTRY).
 *   rdi = vCPU id, rsi = number of vCPUs, rdx = first free GPA in slot 0, rcx = user argument,
 *   r8 = end of slot 0. Real mode: the same in edi/esi/edx/ecx, segments 0, stack below 0x7000.
 *   Long mode: 4-level identity page tables over every memslot, flat 64-bit CS, 16 KiB stack.
 *
 * ucalls (vmm/guest/ucall.py): a 56-byte block {cmd, args[6]} (u64 each) is built on the stack and its
 * address is written with `out %eax, $UCALL_PORT`. Every macro preserves all registers and flags
 * except where it says so. Operands are AT&T: registers (%rax / %eax in real mode), $immediates,
 * or memory; not %rsp-relative.
 *
 *   GUEST_SYNC(stage)               host test gets Ucall(SYNC, (stage, ...))
 *   GUEST_SYNC2(stage, value)       ... with a value
 *   GUEST_SYNC_ARGS($stage, v1..v5) ... with up to five values (operands, so $ on immediates)
 *   GUEST_PRINT("text")             text goes to the host's output
 *   GUEST_ASSERT_EQ(a, b)           if a != b: ABORT with file, line, "a == b", a and b
 *   GUEST_FAIL("why")               unconditional ABORT
 *   GUEST_DONE()                    the guest passed
 *   GUEST_HYPERCALL                 vmcall/vmmcall: KVM patches it to the host CPU's form
 *
 * Define VMM_REAL_MODE before including for 16-bit guests.
 */
#ifndef VMM_H
#define VMM_H

/* The guest ABI's addresses and ports: vmm/guest/layout.py holds the same values, and
 * selftests/harness/test_guest_layout.py checks that the two agree. */
#define UCALL_PORT      0x1000
#define DEBUGCON_PORT   0xe9
#define UCALL_SIZE      56
#define IMAGE_GPA       0x8000
#define IMAGE_END       0x100000
#define REAL_STACK_TOP  0x7000
#define REAL_STACK_SIZE 0x400
#define STACK_SIZE      0x4000
#define DATA_GPA        0x100000000
#define UCALL_SYNC      1
#define UCALL_ABORT     2
#define UCALL_PRINT     3
#define UCALL_DONE      4
#define KVM_HC_MAP_GPA_RANGE 12

#define GUEST_ENTRY     .section .text.entry, "ax"; .globl _start; _start:

#ifdef VMM_REAL_MODE
/* 16-bit: each u64 slot is pushed as two 32-bit halves (high half zero). */
.macro ucall cmd, a0=$0, a1=$0, a2=$0, a3=$0, a4=$0, a5=$0
    pushfl
    pushl %eax
    pushl %edx
    pushl $0; pushl \a5
    pushl $0; pushl \a4
    pushl $0; pushl \a3
    pushl $0; pushl \a2
    pushl $0; pushl \a1
    pushl $0; pushl \a0
    pushl $0; pushl $\cmd
    movzwl %sp, %eax
    movw $UCALL_PORT, %dx
    outl %eax, %dx
    addw $UCALL_SIZE, %sp
    popl %edx
    popl %eax
    popfl
.endm
#define GUEST_CMP(a, b) cmpl b, a
#else
.macro ucall cmd, a0=$0, a1=$0, a2=$0, a3=$0, a4=$0, a5=$0
    pushfq
    pushq %rax
    pushq %rdx
    pushq \a5
    pushq \a4
    pushq \a3
    pushq \a2
    pushq \a1
    pushq \a0
    pushq $\cmd
    movq %rsp, %rax
    movw $UCALL_PORT, %dx
    outl %eax, %dx
    addq $UCALL_SIZE, %rsp
    popq %rdx
    popq %rax
    popfq
.endm
#define GUEST_CMP(a, b) cmpq b, a
#endif

.macro ucall_print text
    .pushsection .rodata
.Lprint_text\@: .ascii "\text"
.Lprint_end\@:
    .popsection
    ucall UCALL_PRINT, $.Lprint_text\@, $(.Lprint_end\@ - .Lprint_text\@)
.endm

.macro ucall_abort file, line, expr, a=$0, b=$0
    .pushsection .rodata
.Labort_file\@: .asciz "\file"
.Labort_expr\@: .asciz "\expr"
    .popsection
    ucall UCALL_ABORT, $.Labort_file\@, $\line, $.Labort_expr\@, \a, \b
.endm

/* After an ABORT the host stops the vCPU; should it resume, stay halted. */
.macro ucall_stop
.Lstop\@: hlt
    jmp .Lstop\@
.endm

.macro ucall_assert_eq a, b, line, file, expr
    GUEST_CMP(\a, \b)
    je .Lassert_ok\@
    ucall_abort "\file", \line, "\expr", \a, \b
    ucall_stop
.Lassert_ok\@:
.endm

#define GUEST_SYNC(stage)           ucall UCALL_SYNC, $(stage)
#define GUEST_SYNC2(stage, value)   ucall UCALL_SYNC, $(stage), value
#define GUEST_SYNC_ARGS(...)        ucall UCALL_SYNC, __VA_ARGS__
#define GUEST_PRINT(text)           ucall_print text
#define GUEST_DONE()                ucall UCALL_DONE
#define VMM_STR(...)                #__VA_ARGS__
#define GUEST_FAIL(why)             ucall_abort __FILE__, __LINE__, why; ucall_stop
#define GUEST_ASSERT_EQ(a, b)       ucall_assert_eq a, b, __LINE__, __FILE__, VMM_STR(a == b)
#define GUEST_HYPERCALL             vmmcall

/* exception handlers for vectors 0-31 (UCALL_EXCEPTION): see vmm_exceptions.h */
#include <vmm_exceptions.h>

#endif
