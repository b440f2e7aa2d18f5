"""Building, loading and running a test guest: the guest ABI's addresses (layout), x86 CPU set-up
(x86), guest images (image), the ucall protocol, the run loop (runner), vCPU dumps (dump) and the
Machine that ties them together (the kernel selftests' kvm_util, processor.c and ucall_common.c)."""

from .image import GuestImage
from .image import load as load_guest
from .machine import Machine
from .runner import Runner
from .ucall import Ucall, UcallCmd
from .x86 import Mode

__all__ = ["GuestImage", "Machine", "Mode", "Runner", "Ucall", "UcallCmd", "load_guest"]
