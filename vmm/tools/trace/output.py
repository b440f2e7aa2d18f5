"""What `vmm trace` prints: one short line per event (thread, time, decoded call), JSON lines, and
the summary. Filters (--only, --vm) apply here, after decoding: the model sees every event."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from vmm.kvm.exits import Exit
from vmm.kvm.uapi import MemFlag

from . import CATEGORIES
from .decode import exit_fields, flag_names, size, vm_type_name

if TYPE_CHECKING:
    from .session import Session

WARNINGS_SHOWN = 10  # per kind; the summary counts them all


@dataclass
class Event:
    """One decoded thing the tracee did."""

    t: float  # seconds since the trace began
    tid: int
    pid: int
    kind: str  # "kvm" | "memory" | "exits" | "process" | "warning"
    text: str
    vm: int | None = None
    data: dict[str, Any] = field(default_factory=dict)
    also: str | None = None  # a second category (a memslot ioctl is kvm and memory)


class Output:
    """Writes events to a text stream and/or a JSON-lines file, filtered."""

    def __init__(
        self,
        text: IO[str] | None,
        json_file: IO[str] | None,
        only: tuple[str, ...] = (),
        vm: int | None = None,
    ) -> None:
        self.text, self.json, self.only, self.vm = text, json_file, set(only), vm
        self.warned: Counter[str] = Counter()
        self.events = 0

    def wanted(self, e: Event) -> bool:
        """The event passes --vm and --only (process lines and warnings always do)."""
        if self.vm is not None and e.vm is not None and e.vm != self.vm:
            return False
        if self.only and e.kind in CATEGORIES:
            return e.kind in self.only or e.also in self.only
        return True

    def emit(self, e: Event) -> None:
        """Write one event (warnings past WARNINGS_SHOWN of a kind only to JSON and the summary)."""
        self.events += 1
        if not self.wanted(e):
            return
        if self.json:
            if isinstance(x := e.data.get("exit"), Exit):  # decoded for JSON only when JSON is asked for
                e.data["exit"] = exit_fields(x)
            self.json.write(
                json.dumps(
                    {
                        "t": round(e.t, 6),
                        "tid": e.tid,
                        "pid": e.pid,
                        "type": e.kind,
                        "vm": e.vm,
                        "text": e.text,
                        **e.data,
                    }
                )
                + "\n"
            )
        if self.text:
            if e.kind == "warning":
                kind = e.data.get("warning", "")
                self.warned[kind] += 1
                if self.warned[kind] > WARNINGS_SHOWN:
                    if self.warned[kind] == WARNINGS_SHOWN + 1:
                        self.text.write(
                            f"{e.tid:>7} {e.t:11.6f} WARNING further {kind} warnings counted in the summary only\n"
                        )
                    return
                self.text.write(f"{e.tid:>7} {e.t:11.6f} WARNING {e.text}\n")
                return
            self.text.write(f"{e.tid:>7} {e.t:11.6f} {e.text}\n")

    def summary(self, s: dict[str, Any]) -> None:
        """The final summary object (JSON) and, when asked, its text."""
        if self.json:
            self.json.write(json.dumps({"type": "summary", **s}) + "\n")

    def flush(self) -> None:
        """Flush both streams."""
        for f in (self.text, self.json):
            if f:
                f.flush()


def _seconds(x: float) -> str:
    return f"{x:.3f}s" if x >= 0.1 else f"{x * 1e3:.3f}ms"


def render_summary(s: dict[str, Any]) -> str:
    """The summary dict as a short human report."""
    n = len(s["processes"])
    lines = [
        f"--- vmm trace summary: {s['events']} events, {s['syscalls']} syscalls from {n} process(es) "
        f"in {_seconds(s['seconds'])}"
    ]
    for p in s["processes"]:
        lines.append(f"process {p['pid']} {p['command']}: {p['end']}")
    for vm in s["vms"]:
        st = vm["stats"]
        lines.append(
            f"vm{vm['index']} ({vm['type']}, pid {vm['pid']}): {len(vm['vcpus'])} vCPU(s), "
            f"{st['memslot_updates']} memslot updates, {len(vm['memslots'])} memslots at the end"
        )
        for m in vm["memslots"]:
            gm = f" guest_memfd {m['guest_memfd']}+{m['guest_memfd_offset']:#x}" if m["guest_memfd"] else ""
            end = m["gpa"] + m["size"]
            lines.append(
                f"  slot {m['slot']:#x}: [{m['gpa']:#x}, {end:#x}) {size(m['size'])} flags={m['flags']} "
                f"hva={m['hva']:#x}{gm}"
            )
        for v in vm["vcpus"]:
            ex = ", ".join(f"{k} {n}" for k, n in sorted(v["exits"].items(), key=lambda x: -x[1])) or "no exits"
            lines.append(
                f"  vcpu{v['index']}: {ex}; {_seconds(v['time_in_run'])} in KVM_RUN, "
                f"{_seconds(v['time_in_vmm'])} in the VMM between exits"
            )
        lines.append(
            f"  conversions {st['conversions']}: {size(st['bytes_to_private'])} to private, "
            f"{size(st['bytes_to_shared'])} to shared; discarded {size(st['discarded_shared'])} shared, "
            f"{size(st['discarded_private'])} private; allocated {size(st['allocated_private'])} private; "
            f"memory faults {st['memory_faults']} ({st['faults_resolved']} answered)"
        )
        for kind, count in sorted(st["warnings"].items()):
            lines.append(f"  WARNING {kind}: {count}")
    if not s["vms"]:
        lines.append("no VM was created")
    return "\n".join(lines)


def summarize(s: Session, seconds: float) -> dict[str, Any]:
    """Everything the summary shows, as JSON-able data."""
    for vm in s.vms:
        vm.finish()
    vms = []
    for vm in s.vms:
        owner = next((p.pid for p in s.procs if vm in p.vms), 0)
        st = vm.stats
        vms.append(
            {
                "index": vm.index,
                "type": vm_type_name(vm.vm_type) if vm.vm_type >= 0 else "unknown (created before the trace)",
                "pid": owner,
                "memslots": [
                    {
                        "slot": s.slot,
                        "flags": flag_names(MemFlag, s.flags),
                        "gpa": s.gpa,
                        "size": s.size,
                        "hva": s.hva,
                        "guest_memfd": s.gmem.name if s.gmem else None,
                        "guest_memfd_offset": s.gmem_offset,
                    }
                    for s in sorted(vm.slots.values(), key=lambda s: s.gpa)
                ],
                "vcpus": [
                    {
                        "index": v.index,
                        "exits": dict(v.exits),
                        "time_in_run": v.time_in_run,
                        "time_in_vmm": v.time_in_vmm,
                    }
                    for v in vm.vcpus
                ],
                "stats": {
                    **{k: getattr(st, k) for k in st.__dataclass_fields__ if k != "warnings"},
                    "warnings": dict(st.warnings),
                },
            }
        )
    return {
        "seconds": seconds,
        "events": s.out.events,
        "syscalls": s.syscalls,
        "processes": [{"pid": p.pid, "command": p.command, "end": p.end} for p in s.procs],
        "vms": vms,
    }
