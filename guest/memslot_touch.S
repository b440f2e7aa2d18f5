/* vmm-guest: mode=long vcpus=1 description="keeps reading a u64 while the host moves or deletes its memslot (set_memory_region_test.c)" */
#include <vmm.h>

/*
 * The guests of the kernel's set_memory_region_test.c (guest_code_move_memory_region() and
 * guest_code_delete_memory_region()). rcx = GPA of the u64 to watch, page aligned; bit 0 set
 * selects the delete variant. When the watched GPA has no memslot the read exits as MMIO and
 * the host answers MMIO_VAL.
 *
 *   SYNC(1, final_rip_start, final_rip_end)   ready; where the delete variant spins forever
 *   SYNC(0, value)                            after each spin: the value that ended it
 */
#define MMIO_VAL 0xbeef

/* spin while the u64 at (%rbx) equals \val; the value that differed is left in %rax */
.macro spin_on val
1:  mov (%rbx), %rax
    cmp \val, %rax
    je 1b
    GUEST_SYNC2(0, %rax)
.endm

/* assert %rax is \a or \b */
.macro assert_one_of a, b
    cmp \a, %rax
    je 2f
    GUEST_ASSERT_EQ(%rax, \b)
2:
.endm

    .pushsection .rodata
null_idt: .word 0
          .quad 0
    .popsection

GUEST_ENTRY
    mov %rcx, %rbx
    and $~1, %rbx
    test $1, %rcx
    jnz delete_region

move_region:
    ucall UCALL_SYNC, $1
    spin_on $0                      /* the move to a misaligned GPA starts */
    assert_one_of $1, $MMIO_VAL
    spin_on $MMIO_VAL               /* the misaligning move completes */
    assert_one_of $1, $0
    spin_on $0                      /* the re-aligning move starts */
    assert_one_of $1, $MMIO_VAL
    spin_on $MMIO_VAL               /* the re-aligning move completes */
    GUEST_ASSERT_EQ(%rax, $1)
    GUEST_DONE()

delete_region:
    /* no IDT: a #PF once the memory is gone escalates to a triple fault instead of looping */
    lidt null_idt
    ucall UCALL_SYNC, $1, $final_rip_start, $final_rip_end
    spin_on $0                      /* the region is deleted */
    GUEST_ASSERT_EQ(%rax, $MMIO_VAL)
    spin_on $MMIO_VAL               /* the region is recreated */
    GUEST_ASSERT_EQ(%rax, $0)
    spin_on $0                      /* the region is deleted again */
    GUEST_ASSERT_EQ(%rax, $MMIO_VAL)
final_rip_start:
    spin_on $MMIO_VAL               /* forever, until the code memslot (slot 0) is deleted */
final_rip_end:
    GUEST_FAIL("spin on MMIO ended")
