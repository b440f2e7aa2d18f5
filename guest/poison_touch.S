/* vmm-guest: mode=long vcpus=1 description="reads the u64 at rcx and syncs it, writes its complement and syncs that, again and again: the guest of the poison tests" */
#include <vmm.h>

/*
 * rcx = GPA of the u64 to touch (a page the host may poison).
 *   SYNC(1, value)     the guest read value from (rcx)
 *   SYNC(2, ~value)    the guest wrote ~value to (rcx); then back to the read
 * CR4.MCE is set first, so the host may route a memory error into the guest as #MC (its stub
 * reports it through UCALL_EXCEPTION).
 */
GUEST_ENTRY
    mov %cr4, %rax
    or $0x40, %rax
    mov %rax, %cr4
1:  mov (%rcx), %rax
    GUEST_SYNC2(1, %rax)
    not %rax
    mov %rax, (%rcx)
    GUEST_SYNC2(2, %rax)
    jmp 1b
