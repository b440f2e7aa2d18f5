/* vmm-guest: mode=long vcpus=1 description="fails a GUEST_ASSERT_EQ on purpose: the host reports file, line and values" */
#include <vmm.h>

GUEST_ENTRY
    mov $41, %rax
    GUEST_ASSERT_EQ(%rax, $42)
    GUEST_DONE()
