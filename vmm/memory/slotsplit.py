"""The conversion design guest_memfd rejected, kept to measure it against vmm's (`vmm bench memslots`
and its tests): convert a range by deleting the memslot that covers it and re-creating it split
around the range, the range as its own slot backed by the other side.

guest_memfd keeps one slot with both a shared hva and a guest_memfd and converts with
KVM_SET_MEMORY_ATTRIBUTES because every memslot update takes kvm->slots_lock, waits for all
SRCU readers (vCPUs in KVM_RUN) and zaps the whole old slot; a vCPU touching the range while it
has no slot exits as MMIO. On a VM with private memory a private slot still needs the attribute
change (KVM takes private-vs-shared from the attributes alone), so that is done here too; on a
default VM only the memslot operations run, to see their cost alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmm.errors import ConversionError
from vmm.kvm.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE, MemFlag

from .regions import Region

if TYPE_CHECKING:
    from vmm.kvm.vm import Vm


class SplitSlot:
    """One region converted the memslot way, one range at a time: ``to_private`` splits its slot in
    up to three (left shared, the range, right shared), ``to_shared`` merges them back. Shared
    pieces bind only the memfd; the private piece binds the region's guest_memfd (``private``: a
    VM with private memory, where attributes are set and the unused side punched as vmm's
    Converter does). The region's own slot number is reused; ``spare`` gives two more. While in
    use the KVM slots no longer match ``region.region``: GuestMemory must not re-issue it."""

    def __init__(self, vm: Vm, region: Region, spare: tuple[int, int], private: bool) -> None:
        if private and region.gmem is None:
            raise ConversionError(f"memslot {region.slot} has no guest_memfd to split private pieces from")
        self.vm, self.region, self.private = vm, region, private
        self.slots = (region.slot, *spare)
        self.live: list[int] = [region.slot]  # the slots bound now
        self.range: tuple[int, int] | None = None  # (offset, size) split out, if any
        self._delete(region.slot)
        self._bind(region.slot, 0, region.size, gmem=False)  # shared pieces bind the memfd only

    def _bind(self, slot: int, offset: int, size: int, gmem: bool) -> None:
        r = self.region
        g = r.gmem if gmem else None
        self.vm.set_user_memory_region2(
            slot,
            MemFlag.GUEST_MEMFD if g else 0,
            r.gpa + offset,
            size,
            r.userspace_addr + offset,
            g.fd if g else 0,
            r.gmem_offset + offset if g else 0,
        )

    def _delete(self, slot: int) -> None:
        self.vm.set_user_memory_region2(slot, 0, 0, 0)

    def to_private(self, offset: int, size: int) -> int:
        """Split [offset, offset+size) of the region out as its own slot (and make it private);
        returns the memslot operations issued."""
        if self.range is not None:
            raise ConversionError(f"memslot {self.slots[0]}: [{self.range[0]:#x}, +{self.range[1]:#x}) is still split")
        end, total = offset + size, self.region.size
        if size <= 0 or offset < 0 or end > total:
            raise ConversionError(f"[{offset:#x}, +{size:#x}) is not inside memslot {self.slots[0]} ({total:#x} bytes)")
        left, mid, right = self.slots
        self._delete(left)
        self.live = []
        pieces = [(left, 0, offset, False), (mid, offset, size, self.private), (right, end, total - end, False)]
        for slot, off, n, gmem in pieces:
            if n:
                self._bind(slot, off, n, gmem)
                self.live.append(slot)
        self.range = (offset, size)
        if self.private:
            self.vm.set_memory_attributes(self.region.gpa + offset, size, KVM_MEMORY_ATTRIBUTE_PRIVATE)
            self.region.punch_hole_shared(offset, size)
        return 1 + len(self.live)

    def to_shared(self) -> int:
        """Merge the split range back into one shared slot; returns the memslot operations issued."""
        if self.range is None:
            raise ConversionError(f"memslot {self.slots[0]} has no split range to merge back")
        offset, size = self.range
        if self.private:
            self.vm.set_memory_attributes(self.region.gpa + offset, size, 0)
        ops = len(self.live) + 1
        for slot in reversed(self.live):
            self._delete(slot)
        self.live = []
        self._bind(self.slots[0], 0, self.region.size, gmem=False)
        self.live = [self.slots[0]]
        self.range = None
        if self.private:
            self.region.punch_hole_private(offset, size)
        return ops
