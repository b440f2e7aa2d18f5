/*
 * vmm guest ABI for GNU-as guests (preprocessed with cpp, so use C comments, not '#').
 *
 * Entry: the image is loaded at 0x8000 and starts at its first byte (GUEST_ENTRY).
 *   rdi = vCPU id, rsi = number of vCPUs, rdx = first free GPA in slot 0, rcx = user argument,
 *   r8 = end of slot 0. Real mode: the same in edi/esi/edx/ecx, segments 0, stack below 0x7000.
 *   Long mode: 4-level identity page tables over every memslot, flat 64-bit CS, 16 KiB stack.
 *
 * ucalls (vmm/guest/ucall.py): each vCPU owns a 64-byte block at UCALL_GPA + id * UCALL_SLOT, which the
 * host points %gs at (long mode: GS.base; real mode: the GS selector). A ucall writes its header
 * {cmd | nargs << 8 | width}, then its arguments (u64 slots; real mode writes the low halves), and
 * exits with one `outb %al, $UCALL_PORT`: as few guest instructions as a call can take, because
 * here every guest instruction is dear (README "Benchmarks": about 0.14 us each, 0.5 us per
 * store, on this host's kvm_pvm). Every macro preserves all registers and flags. SYNC arguments are registers
 * or $immediates (32-bit, sign-extended); ASSERT operands may also be memory.
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
#define UCALL_PORT      0xe0
#define DEBUGCON_PORT   0xe9
#define UCALL_GPA       0x3000
#define UCALL_SLOT      64
#define UCALL_WIDE      0x10000
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
.macro ucall_store a, off
    movl \a, %gs:\off
.endm
.macro ucall_spill a, off
    pushl \a
    popl %gs:\off
.endm
#define UCALL_WIDTH     0
#define GUEST_CMP(a, b) cmpl b, a
#else
.macro ucall_store a, off
    movq \a, %gs:\off
.endm
.macro ucall_spill a, off
    pushq \a
    popq %gs:\off
.endm
#define UCALL_WIDTH     UCALL_WIDE
#define GUEST_CMP(a, b) cmpq b, a
#endif

/* Store the non-blank operands in slots 0, 1, ...; their count goes in the header. */
.macro ucall_args slot, a0, a1, a2, a3, a4, a5
    .ifnb \a0
    ucall_store \a0, "(8 + 8 * \slot)"
    ucall_args "(\slot + 1)", \a1, \a2, \a3, \a4, \a5
    .else
    .set .Lucall_nargs, \slot
    .endif
.endm

/* One ucall: header, the given arguments, one exit. */
.macro ucall cmd, a0, a1, a2, a3, a4, a5
    ucall_args 0, \a0, \a1, \a2, \a3, \a4, \a5
    movl $(\cmd | (.Lucall_nargs << 8) | UCALL_WIDTH), %gs:0
    outb %al, $UCALL_PORT
.endm

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
    /* the compared operands may be memory: copied through the stack (the guest stops after this) */
    ucall_spill \a, 32
    ucall_spill \b, 40
    ucall_store $.Labort_file\@, 8
    ucall_store $\line, 16
    ucall_store $.Labort_expr\@, 24
    movl $(UCALL_ABORT | (5 << 8) | UCALL_WIDTH), %gs:0
    outb %al, $UCALL_PORT
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
