/* vmm-guest: mode=long vcpus=1 description="hostile ucalls selected by rcx: host paths as assert file names, bad pointers, unknown commands, control characters" */
#include <vmm.h>

/*
 * rcx bits 0-7 select the attack, rcx >> 8 is its parameter (a GPA where one is needed).
 * The host must treat every string and pointer below as data: it must not open a path the guest
 * names, and a pointer or length outside guest memory is the guest's failure, not a usage error.
 */
#define ABORT_ABSOLUTE      0   /* assert in "/etc/passwd", line 1 */
#define ABORT_DOTDOT        1   /* assert in "../../../../../../../../etc/passwd", line 1 */
#define ABORT_DEV_ZERO      2   /* assert in "/dev/zero", line 1 */
#define ABORT_NAME_AT_PARAM 3   /* assert in the NUL-terminated name the host wrote at GPA rcx >> 8 */
#define ABORT_CONTROL       4   /* file name and expression full of terminal escapes */
#define HEADER_NARGS        5   /* a SYNC header claiming 7 arguments (the block has 6 slots) */
#define HEADER_BITS         6   /* a SYNC header with bit 24 set (no such field) */
#define PRINT_BAD_POINTER   7   /* PRINT of 5 bytes at 0xdead00000000 */
#define PRINT_HUGE_LENGTH   8   /* PRINT of 1 TiB from a valid address */
#define ABORT_BAD_FILE      9   /* assert whose file name pointer is 0xdead00000000 */
#define UNKNOWN_COMMAND     10  /* ucall command 0x77 */
#define PRINT_CONTROL       11  /* PRINT of text with terminal escapes */
#define PRINT_LONG          12  /* PRINT of 64 KiB of valid memory (the image and what follows) */
#define ABORT_BAD_EXPR      13  /* assert whose expression pointer is 0xdead00000000 */
#define ABORT_OWN_FILE      14  /* an honest GUEST_FAIL in this file: the host may show its line */
#define ABORT_HUGE_LINE     15  /* assert in this file's own name at line 2^64 - 1 */

.macro select n, label
    cmp $\n, %rbx
    je \label
.endm

GUEST_ENTRY
    mov %rcx, %rbx
    and $0xff, %rbx
    mov %rcx, %rsi
    shr $8, %rsi
    select ABORT_ABSOLUTE, abort_absolute
    select ABORT_DOTDOT, abort_dotdot
    select ABORT_DEV_ZERO, abort_dev_zero
    select ABORT_NAME_AT_PARAM, abort_name_at_param
    select ABORT_CONTROL, abort_control
    select HEADER_NARGS, header_nargs
    select HEADER_BITS, header_bits
    select PRINT_BAD_POINTER, print_bad_pointer
    select PRINT_HUGE_LENGTH, print_huge_length
    select ABORT_BAD_FILE, abort_bad_file
    select UNKNOWN_COMMAND, unknown_command
    select PRINT_CONTROL, print_control
    select PRINT_LONG, print_long
    select ABORT_BAD_EXPR, abort_bad_expr
    select ABORT_OWN_FILE, abort_own_file
    select ABORT_HUGE_LINE, abort_huge_line
    GUEST_FAIL("unknown attack selector")

abort_absolute:
    ucall UCALL_ABORT, $name_absolute, $1, $expr_plain
    jmp stop
abort_dotdot:
    ucall UCALL_ABORT, $name_dotdot, $1, $expr_plain
    jmp stop
abort_dev_zero:
    ucall UCALL_ABORT, $name_dev_zero, $1, $expr_plain
    jmp stop
abort_name_at_param:
    ucall UCALL_ABORT, %rsi, $1, $expr_plain
    jmp stop
abort_control:
    ucall UCALL_ABORT, $name_control, $1, $expr_control
    jmp stop
header_nargs:
    movl $(UCALL_SYNC | (7 << 8) | UCALL_WIDE), %gs:0
    outb %al, $UCALL_PORT
    jmp stop
header_bits:
    movl $(UCALL_SYNC | (1 << 24) | UCALL_WIDE), %gs:0
    outb %al, $UCALL_PORT
    jmp stop
print_bad_pointer:
    movabs $0xdead00000000, %rax
    ucall UCALL_PRINT, %rax, $5
    GUEST_DONE()
print_huge_length:
    movabs $0x10000000000, %rax
    ucall UCALL_PRINT, $text_control, %rax
    GUEST_DONE()
abort_bad_file:
    movabs $0xdead00000000, %rax
    ucall UCALL_ABORT, %rax, $1, $expr_plain
    jmp stop
unknown_command:
    ucall 0x77, $1, $2
    GUEST_DONE()
print_control:
    ucall UCALL_PRINT, $text_control, $(text_control_end - text_control)
    GUEST_DONE()
print_long:
    ucall UCALL_PRINT, $IMAGE_GPA, $0x10000
    GUEST_DONE()
abort_bad_expr:
    movabs $0xdead00000000, %rax
    ucall UCALL_ABORT, $name_own, $1, %rax
    jmp stop
abort_own_file:
    GUEST_FAIL("own file")
abort_huge_line:
    ucall UCALL_ABORT, $name_own, $-1, $expr_plain
    jmp stop

stop:
    hlt
    jmp stop

    .section .rodata
name_absolute:  .asciz "/etc/passwd"
name_dotdot:    .asciz "../../../../../../../../etc/passwd"
name_dev_zero:  .asciz "/dev/zero"
name_own:       .asciz "hostile_ucall.S"
name_control:   .asciz "evil\033[2J\033[H\rname.S"
expr_plain:     .asciz "hostile"
expr_control:   .asciz "\033]0;pwned\007x == y"
text_control:   .ascii "\033[2J\rhidden\033[0m"
text_control_end:
