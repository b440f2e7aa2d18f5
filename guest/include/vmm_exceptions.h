/*
 * Exception handlers every guest carries (included by vmm.h): one 16-byte stub per vector 0-31
 * and a common handler that reports the exception to the host with one ucall and stops:
 *
 *   UCALL_EXCEPTION  args[0] = vector | (bank << 8) | (EXC_BANK_FOUND if a bank reported, #MC only)
 *                    args[1] = error code (#MC: MCG_STATUS), args[2] = RIP (real mode: CS*16+IP),
 *                    args[3] = CR2, args[4] = MCi_STATUS, args[5] = MCi_ADDR (#MC: first bank
 *                    whose MCi_STATUS.VAL is set)
 *
 * The VMM finds the stubs through the table below (its magic, then the stubs' address and the code
 * size they were assembled for, as a multiboot loader finds its header) and points IDT entries
 * 0-31 at them (long mode: an IDT at IDT_GPA; real mode: the IVT at 0). A guest may still install
 * an IDT of its own with lidt. The run loop turns the ucall into vmm.errors.GuestException.
 */
#ifndef VMM_EXCEPTIONS_H
#define VMM_EXCEPTIONS_H

#define UCALL_EXCEPTION     5           /* the kernel selftests' UCALL_UNHANDLED */
#define IDT_GPA             0x1800
#define EXC_STUB_SIZE       16
#define EXC_VECTORS         32
#define EXC_BANK_FOUND      0x10000
#define EXC_TABLE_MAGIC     0x5c3e7a1d9b0f6e42
#define MSR_MCG_CAP         0x179
#define MSR_MCG_STATUS      0x17a
#define MSR_MC0_STATUS      0x401
#define MSR_MC0_ADDR        0x402

    .pushsection .rodata.vmm_exceptions, "a"
    .balign 8
    .quad EXC_TABLE_MAGIC, vmm_exception_stubs
#ifdef VMM_REAL_MODE
    .quad 16
#else
    .quad 64
#endif
    .popsection

    .pushsection .text.vmm_exceptions, "ax"
#ifdef VMM_REAL_MODE
    .code16
#endif
    .balign EXC_STUB_SIZE
vmm_exception_stubs:
    vmm_vector = 0
    .rept EXC_VECTORS
    .balign EXC_STUB_SIZE
#ifndef VMM_REAL_MODE
    /* the CPU pushes an error code for these; push 0 for the others so every frame looks alike */
    .if !(vmm_vector == 8 || (vmm_vector >= 10 && vmm_vector <= 14) || vmm_vector == 17 || vmm_vector == 21 || vmm_vector == 29 || vmm_vector == 30)
    pushq $0
    .endif
    pushq $vmm_vector
#else
    pushw $vmm_vector
#endif
    jmp vmm_exception_common
    vmm_vector = vmm_vector + 1
    .endr

vmm_exception_common:
#ifndef VMM_REAL_MODE
    /* (%rsp) vector, 8(%rsp) error code, 16(%rsp) RIP: the ucall operands may not be %rsp-relative */
    movq (%rsp), %r8
    movq 8(%rsp), %r9
    movq 16(%rsp), %r10
    movq %cr2, %r11
    xorl %r12d, %r12d
    xorl %r13d, %r13d
    cmpq $18, %r8
    jne 3f
    /* #MC: MCG_STATUS in the error code's place, then the first bank with MCi_STATUS.VAL */
    movl $MSR_MCG_STATUS, %ecx
    rdmsr
    shlq $32, %rdx
    orq %rax, %rdx
    movq %rdx, %r9
    movl $MSR_MCG_CAP, %ecx
    rdmsr
    movzbl %al, %esi
    xorl %ebx, %ebx
1:  cmpl %esi, %ebx
    jae 3f
    leal MSR_MC0_STATUS(,%rbx,4), %ecx
    rdmsr
    shlq $32, %rdx
    orq %rax, %rdx
    btq $63, %rdx
    jc 2f
    incl %ebx
    jmp 1b
2:  movq %rdx, %r12
    leal MSR_MC0_ADDR(,%rbx,4), %ecx
    rdmsr
    shlq $32, %rdx
    orq %rax, %rdx
    movq %rdx, %r13
    shlq $8, %rbx
    orq %rbx, %r8
    orq $EXC_BANK_FOUND, %r8
3:  ucall UCALL_EXCEPTION, %r8, %r9, %r10, %r11, %r12, %r13
#else
    /* (%sp) vector, 2(%sp) IP, 4(%sp) CS: report the linear address CS*16+IP */
    movw %sp, %bp
    movzwl (%bp), %eax
    movzwl 4(%bp), %ebx
    shll $4, %ebx
    movzwl 2(%bp), %ecx
    addl %ecx, %ebx
    ucall UCALL_EXCEPTION, %eax, $0, %ebx
#endif
    ucall_stop
    .popsection

#endif
