"""Guest memory and private<->shared conversion: memslots and their backings (regions), vmm's own
attribute map, the conversion engine (attributes, then PUNCH_HOLE of the unused side) and the exit
handlers that drive it from KVM_EXIT_MEMORY_FAULT and KVM_HC_MAP_GPA_RANGE, refusing to make
private what vmm placed for the guest itself (faults); demand paging on memory attributes (paging)
and on userfaultfd (uffd_paging)."""

from .attributes import AttributeMap
from .convert import ConversionPolicy, Converter, Granularity
from .faults import PrivateMemoryHandlers, ProtectedRange
from .paging import DemandPager, PageSource
from .regions import HUGE_PAGE_SIZE, PAGE_SIZE, Backing, GuestMemory, HugePages, Region

__all__ = [
    "HUGE_PAGE_SIZE",
    "PAGE_SIZE",
    "AttributeMap",
    "Backing",
    "ConversionPolicy",
    "DemandPager",
    "Converter",
    "Granularity",
    "GuestMemory",
    "HugePages",
    "PageSource",
    "PrivateMemoryHandlers",
    "ProtectedRange",
    "Region",
]
