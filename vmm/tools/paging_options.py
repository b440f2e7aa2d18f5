"""`vmm boot --demand-paging SOURCE [--fetch 4k|2m] [--prefetch N]`: the options checked (one line on
a mistake) and the pager attached to the machine (the paging itself is vmm.memory.paging)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vmm.guest import Machine, demand
from vmm.guest.demand import PAGED_GPA
from vmm.memory.paging import FETCH_UNITS, DemandPager, PageSource

from .units import human_size
from .usage import fail


@dataclass(frozen=True)
class PagingOptions:
    """A checked --demand-paging: the source file, the paged size (the file's, rounded up to the
    fetch unit), the unit and the prefetch count."""

    path: Path
    size: int
    unit: int
    prefetch: int

    def attach(self, m: Machine, guest: str, arg: int | None) -> tuple[DemandPager, int]:
        """Page [4 GiB, +size) of ``m`` from the file; returns the pager and the guest's rcx: the
        demand_paging guest gets a parameter block (each vCPU touches its share of the pages, no
        pattern check), any other guest the paged GPA (or ``arg`` when given)."""
        pager = m.add_demand_paged_memory(
            PAGED_GPA, self.size, PageSource.from_file(self.path), fetch=self.unit, prefetch=self.prefetch
        )
        if guest != demand.GUEST or arg is not None:
            return pager, PAGED_GPA if arg is None else arg
        at = demand.params_gpa(m.memory)
        per = self.size // len(m.vcpus) // 4096 * 4096
        demand.write_params(m.memory, at, PAGED_GPA, per, 0, check=False)
        return pager, at

    def summary(self, pager: DemandPager, elapsed: float) -> str:
        """faults, fetches, bytes and time, and what is present now."""
        s = pager.stats
        rate = f", {s.bytes / 4096 / elapsed:.0f} pages/s" if elapsed > 0 else ""
        return (
            f"{self.path} ({human_size(self.size)}, {human_size(self.unit)} fetches, prefetch {self.prefetch}): "
            f"{s.faults} faults ({s.stale_faults} stale), {s.fetches} fetches, {human_size(s.bytes)} in "
            f"{s.fetch_seconds * 1000:.1f} ms of fetching{rate}; {human_size(pager.present_bytes())} present"
        )


def paging_options(
    source: str | None, fetch: str | None, prefetch: int | None, vm_type: str | None
) -> PagingOptions | None:
    """The checked options (None without --demand-paging); a mistake ends the command in one line."""
    if source is None:
        if fetch is not None or prefetch is not None:
            fail(f"{'--fetch' if fetch is not None else '--prefetch'} needs --demand-paging SOURCE")
        return None
    if vm_type == "default":
        fail("--demand-paging needs --vm-type sw_protected (memory-fault exits), not default")
    path = Path(source)
    if not path.is_file():
        fail(f"--demand-paging {source}: {'not a regular file' if path.exists() else 'not found'}")
    if not os.access(path, os.R_OK):
        fail(f"--demand-paging {source}: not readable")
    length = path.stat().st_size
    if not length:
        fail(f"--demand-paging {source}: empty (nothing to page in)")
    unit = FETCH_UNITS[fetch or "4k"]
    return PagingOptions(path, -(-length // unit) * unit, unit, prefetch or 0)
