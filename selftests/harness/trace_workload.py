"""A vmm run for test_trace.py to trace: it prints, as one JSON line, what vmm itself knows it did
(memslots, exit counts, conversion counters), for the test to compare with what the tracer saw.

    python trace_workload.py exits N       bench_exits guest: N SYNCs and a DONE (one VM, default type)
    python trace_workload.py convert SIZE  convert_sweep guest: [4 GiB, +SIZE) to private and back in
                                           4K steps (KVM_X86_SW_PROTECTED_VM, guest_memfd + memfd)
"""

from __future__ import annotations

import json
import struct
import sys

from vmm.guest import load_guest
from vmm.guest.layout import DATA_GPA
from vmm.guest.machine import Machine
from vmm.guest.ucall import Ucall, UcallCmd
from vmm.kvm.uapi import ExitReason, VmType, enum_name
from vmm.memory.regions import PAGE_SIZE


def _report(m: Machine, extra: dict) -> None:
    counts = m.runners[0].exit_counts
    print(
        json.dumps(
            {
                "memslots": [
                    {"slot": r.slot, "gpa": r.gpa, "size": r.size, "flags": int(r.flags)} for r in m.memory.regions
                ],
                "exits": {enum_name(ExitReason, i): n for i, n in enumerate(counts) if n},
                **extra,
            }
        ),
        flush=True,
    )


def exits(n: int) -> None:
    with Machine() as m:
        m.load(load_guest("bench_exits"), arg=n)
        seen = 0
        while isinstance(uc := m.run(), Ucall) and uc.cmd == UcallCmd.SYNC:
            seen += 1
        assert isinstance(uc, Ucall) and uc.cmd == UcallCmd.DONE and seen == n, uc
        _report(m, {"syncs": seen})


def convert(size: int) -> None:
    with Machine(vm_type=VmType.SW_PROTECTED) as m:
        m.add_private_memory(DATA_GPA, size)
        m.load(load_guest("convert_sweep"), arg=DATA_GPA)
        assert m.allocator is not None and m.converter is not None
        m.memory.write(m.allocator.next, struct.pack("<QQ", size, PAGE_SIZE))
        for stage in (1, 2):
            uc = m.run(timeout=60)
            assert isinstance(uc, Ucall) and uc.cmd == UcallCmd.SYNC and uc.args[0] == stage, uc
        uc = m.run(timeout=60)
        assert isinstance(uc, Ucall) and uc.cmd == UcallCmd.DONE, uc
        st = m.converter.stats
        _report(
            m,
            {
                "conversions": st.conversions,
                "bytes_to_private": st.bytes_to_private,
                "bytes_to_shared": st.bytes_to_shared,
                "data_gpa": DATA_GPA,
            },
        )


if __name__ == "__main__":
    {"exits": exits, "convert": convert}[sys.argv[1]](int(sys.argv[2]))
