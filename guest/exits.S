/* vmm-guest: mode=long vcpus=1 description="provokes the exit selected by rcx (see EXIT_* below)" */
#include <vmm.h>

/* rcx selects the exit; r8 is the end of slot 0, used as an address with no memslot (MMIO) */
#define EXIT_HLT        0
#define EXIT_MMIO       1   /* write then read 8 bytes at r8: the host maps it, no memslot backs it */
#define EXIT_SHUTDOWN   2   /* ud2 under an IDT of limit 0: #UD -> #GP -> #DF -> triple fault */
#define EXIT_FETCH_MMIO 3   /* jump to r8: instruction fetch from MMIO, KVM cannot emulate it */
#define EXIT_HYPERCALL  4   /* KVM_HC_MAP_GPA_RANGE(rdx, 1 page, 0): the result is synced back */
#define EXIT_PIO_IN     5   /* in from port 0x80: the host supplies the byte, synced back */
#define EXIT_SPIN       6   /* loop forever without exiting (timeouts) */
#define EXIT_DEBUGCON   7   /* print "hi\n" byte by byte on port 0xe9 */

GUEST_ENTRY
    cmp $EXIT_HLT, %rcx
    je do_hlt
    cmp $EXIT_MMIO, %rcx
    je do_mmio
    cmp $EXIT_SHUTDOWN, %rcx
    je do_shutdown
    cmp $EXIT_FETCH_MMIO, %rcx
    je do_fetch_mmio
    cmp $EXIT_HYPERCALL, %rcx
    je do_hypercall
    cmp $EXIT_PIO_IN, %rcx
    je do_pio_in
    cmp $EXIT_SPIN, %rcx
    je do_spin
    cmp $EXIT_DEBUGCON, %rcx
    je do_debugcon
    GUEST_FAIL("unknown exit selector")

do_hlt:
    hlt
    GUEST_DONE()

do_mmio:
    movabs $0x1122334455667788, %rax
    mov %rax, (%r8)
    mov (%r8), %rbx
    GUEST_SYNC2(1, %rbx)
    GUEST_DONE()

do_shutdown:
    lidt null_idt                   /* replace vmm's IDT (vmm_exceptions.h), which would report the #UD */
    ud2

do_fetch_mmio:
    jmp *%r8

do_hypercall:
    mov $KVM_HC_MAP_GPA_RANGE, %rax
    mov %rdx, %rbx
    mov $1, %rcx
    xor %rdx, %rdx
    GUEST_HYPERCALL
    GUEST_SYNC2(1, %rax)
    GUEST_DONE()

do_pio_in:
    xor %rax, %rax
    in $0x80, %al
    GUEST_SYNC2(1, %rax)
    GUEST_DONE()

do_spin:
    jmp do_spin

do_debugcon:
    mov $DEBUGCON_PORT, %dx
    mov $'h', %al
    out %al, %dx
    mov $'i', %al
    out %al, %dx
    mov $'\n', %al
    out %al, %dx
    GUEST_DONE()

    .section .rodata
    .balign 8
null_idt:
    .word 0
    .quad 0
