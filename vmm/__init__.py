"""vmm: a Python userspace VMM harness over /dev/kvm for testing KVM's guest_memfd private memory.

The public API a test author needs; the layers beneath are vmm.kvm (the binding), vmm.memory
(guest memory and conversions) and vmm.guest (building and running test guests)::

    from vmm import Machine, load_guest, UcallCmd

    with Machine() as m:
        m.load(load_guest("hello"))
        [done] = m.run_all(timeout=10)
        assert done.cmd == UcallCmd.DONE
"""

__version__ = "0.2.0"

from vmm.errors import (  # noqa: E402  (after __version__: setup tools read it without importing)
    ConversionError,
    GuestAssertion,
    GuestError,
    GuestTimeout,
    KvmError,
    MemoryFaultError,
    UcallError,
    UnexpectedExit,
    VcpuStopped,
    VmmError,
)
from vmm.guest import GuestImage, Machine, Mode, Ucall, UcallCmd, load_guest  # noqa: E402
from vmm.kvm import Cap, Exit, ExitHandlers, ExitReason, GmemFlag, GuestMemfd, Kvm, MemFlag, Vcpu, Vm, VmType  # noqa: E402
from vmm.memory import (  # noqa: E402
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    Backing,
    ConversionPolicy,
    Converter,
    GuestMemory,
    PrivateMemoryHandlers,
    Region,
)

__all__ = [
    "HUGE_PAGE_SIZE",
    "PAGE_SIZE",
    "Backing",
    "Cap",
    "ConversionError",
    "ConversionPolicy",
    "Converter",
    "Exit",
    "ExitHandlers",
    "ExitReason",
    "GmemFlag",
    "GuestAssertion",
    "GuestError",
    "GuestImage",
    "GuestMemfd",
    "GuestMemory",
    "GuestTimeout",
    "Kvm",
    "KvmError",
    "Machine",
    "MemFlag",
    "MemoryFaultError",
    "Mode",
    "PrivateMemoryHandlers",
    "Region",
    "Ucall",
    "UcallCmd",
    "UcallError",
    "UnexpectedExit",
    "Vcpu",
    "VcpuStopped",
    "Vm",
    "VmType",
    "VmmError",
    "__version__",
    "load_guest",
]
