/* vmm-guest: mode=long vcpus=1 description="console (port 0xe9) output selected by rcx: lines without a newline, floods, escapes" */
#include <vmm.h>

/* rcx bits 0-7 select what to write, rcx >> 8 is a byte count where one is needed */
#define PARTIAL_DONE     0  /* "partial line" without a newline, then GUEST_DONE */
#define PARTIAL_ASSERT   1  /* "partial line", then a failed GUEST_ASSERT_EQ */
#define PARTIAL_SPIN     2  /* "partial line", then spin until the host's timeout */
#define FLOOD_OUTB       3  /* rcx >> 8 bytes of 'A', one OUT each, no newline (0: forever), then DONE */
#define FLOOD_REP_OUTSB  4  /* rcx >> 8 bytes of 'A' by rep outsb, 64 KiB per instruction, then DONE */
#define CONTROL          5  /* a line full of terminal escapes, then DONE */
#define PARTIAL_HLT      6  /* "partial line", then hlt */
#define LINES_OUTB       7  /* rcx >> 8 lines "line\n", one OUT per byte, then DONE */

.macro select n, label
    cmp $\n, %rbx
    je \label
.endm

/* write the NUL-terminated string at \label to the console, one OUT per byte (clobbers rsi, al, dx) */
.macro console label
    mov $\label, %rsi
    mov $DEBUGCON_PORT, %dx
1:  mov (%rsi), %al
    test %al, %al
    jz 2f
    out %al, %dx
    inc %rsi
    jmp 1b
2:
.endm

GUEST_ENTRY
    mov %rcx, %rbx
    and $0xff, %rbx
    mov %rcx, %r9
    shr $8, %r9
    mov %rdx, %r10      /* first free GPA: scratch for the rep outsb source */
    select PARTIAL_DONE, partial_done
    select PARTIAL_ASSERT, partial_assert
    select PARTIAL_SPIN, partial_spin
    select FLOOD_OUTB, flood_outb
    select FLOOD_REP_OUTSB, flood_rep_outsb
    select CONTROL, control
    select PARTIAL_HLT, partial_hlt
    select LINES_OUTB, lines_outb
    GUEST_FAIL("unknown console selector")

partial_done:
    console partial
    GUEST_DONE()

partial_assert:
    console partial
    mov $1, %rax
    GUEST_ASSERT_EQ(%rax, $2)
    GUEST_DONE()

partial_spin:
    console partial
3:  jmp 3b

flood_outb:
    mov $DEBUGCON_PORT, %dx
    mov $'A', %al
4:  out %al, %dx
    test %r9, %r9
    jz 4b               /* count 0: forever */
    dec %r9
    jnz 4b
    GUEST_DONE()

flood_rep_outsb:
    /* 64 KiB of 'A' at the first free GPA, then rep outsb from it until r9 bytes are out */
    mov %r10, %rdi
    mov $0x10000, %rcx
    mov $'A', %al
    rep stosb
    mov $DEBUGCON_PORT, %dx
5:  mov %r9, %rcx
    cmp $0x10000, %rcx
    jbe 6f
    mov $0x10000, %rcx
6:  sub %rcx, %r9
    mov %r10, %rsi
    rep outsb
    test %r9, %r9
    jnz 5b
    GUEST_DONE()

control:
    console escapes
    GUEST_DONE()

partial_hlt:
    console partial
    hlt
    GUEST_DONE()

lines_outb:
7:  test %r9, %r9
    jz 8f
    console line
    dec %r9
    jmp 7b
8:  GUEST_DONE()

    .section .rodata
partial:    .asciz "partial line"
escapes:    .asciz "\033[2J\033[Hred\rX\n"
line:       .asciz "line\n"
