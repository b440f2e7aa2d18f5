"""What each traced syscall means for KVM and guest memory: per-process fd tables (which fd is
/dev/kvm, a VM, a vCPU, a guest_memfd or a memfd), mappings, and the VM models they update. The
tracer (tracer.py) hands over each syscall's entry and exit; this module decodes and records."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from vmm.kvm import syscalls, uapi

from . import decode as d
from . import ioctls
from .model import File, Vcpu, VmModel
from .output import Event, Output

FdRef = tuple[str, Any]  # ("kvm", None) | ("vm", VmModel) | ("vcpu", Vcpu) | ("guest_memfd" | "memfd", File)

_OPEN = {d.NR["open"], d.NR["openat"], d.NR["openat2"]}
_DUP = {d.NR["dup"], d.NR["dup2"], d.NR["dup3"]}
_MEMORY = {d.NR[n] for n in ("mmap", "munmap", "madvise", "fallocate", "memfd_create", "close", "close_range", "fcntl")}
INTERESTING = _OPEN | _DUP | _MEMORY | {d.NR_IOCTL}
_NR_MMAP, _NR_MUNMAP, _NR_MADVISE = d.NR["mmap"], d.NR["munmap"], d.NR["madvise"]
_NR_FALLOCATE, _NR_MEMFD, _NR_CLOSE = d.NR["fallocate"], d.NR["memfd_create"], d.NR["close"]
_NR_CLOSE_RANGE, _NR_FCNTL = d.NR["close_range"], d.NR["fcntl"]
_KVM_RUN = uapi.KVM_RUN


@dataclass(eq=False)
class Proc:
    """A traced process (thread group): its fds and the VMs it made."""

    pid: int
    command: str
    fds: dict[int, FdRef] = field(default_factory=dict)
    vms: list[VmModel] = field(default_factory=list)
    end: str = "running"


class Session:
    """Everything one `vmm trace` saw, and the events it emits."""

    def __init__(self, out: Output) -> None:
        self.out = out
        self.t0 = time.monotonic()
        self.procs: list[Proc] = []
        self.vms: list[VmModel] = []
        self.syscalls = 0
        self.requests: dict[int, Any] = {}  # tid -> an argument struct as it was at syscall entry
        self._tid = 0

    # --- events -----------------------------------------------------------------------------

    def now(self) -> float:
        """Seconds since the trace began."""
        return time.monotonic() - self.t0

    def emit(
        self,
        tid: int,
        proc: Proc,
        kind: str,
        text: str,
        vm: VmModel | None = None,
        also: str | None = None,
        **data: Any,
    ) -> None:
        """Emit one event of ``proc``'s thread ``tid``."""
        self.out.emit(Event(self.now(), tid, proc.pid, kind, text, vm.index if vm else None, data, also))

    def process_event(self, tid: int, proc: Proc, text: str, **data: Any) -> None:
        """A process line: attach, fork, exec, exit."""
        self.emit(tid, proc, "process", text, **data)

    def _warn(self, kind: str, message: str) -> None:
        self.out.emit(Event(self.now(), self._tid, 0, "warning", message, None, {"warning": kind}))

    # --- processes --------------------------------------------------------------------------

    def new_process(self, pid: int, command: str, parent: Proc | None = None) -> Proc:
        """A process to follow (a fork child inherits its parent's fds and VMs)."""
        p = Proc(pid, command)
        if parent:
            p.fds, p.vms = dict(parent.fds), list(parent.vms)
        self.procs.append(p)
        return p

    def exec(self, tid: int, proc: Proc, path: str) -> None:
        """The process exec'd: close-on-exec fds and every mapping are gone."""
        proc.command = path
        live = set()
        try:
            live = {int(n) for n in os.listdir(f"/proc/{proc.pid}/fd")}
        except OSError:
            pass
        proc.fds = {fd: ref for fd, ref in proc.fds.items() if fd in live}
        for vm in proc.vms:
            for v in vm.vcpus:
                v.run_addr = None
            for g in vm.gmems:
                g.maps.clear()
        self.process_event(tid, proc, f"exec {path}", event="exec", path=path)

    # --- fds --------------------------------------------------------------------------------

    def classify(self, proc: Proc, fd: int) -> FdRef | None:
        """An fd this trace did not see created (attached late, or passed in): ask /proc."""
        try:
            target = os.readlink(f"/proc/{proc.pid}/fd/{fd}")
        except OSError:
            return None
        ref: FdRef | None = None
        if target == "/dev/kvm":
            ref = ("kvm", None)
        elif target.startswith("anon_inode:kvm-vm"):
            ref = ("vm", self.new_vm(proc, -1))
        elif target.startswith("anon_inode:kvm-vcpu:"):
            index = int(target.rsplit(":", 1)[1])
            vm = proc.vms[-1] if proc.vms else self.new_vm(proc, -1)
            vcpu = Vcpu(vm, index, run_addr=_vcpu_mapping(proc.pid, index))
            vm.vcpus.append(vcpu)
            ref = ("vcpu", vcpu)
        elif target.startswith("anon_inode:[kvm-gmem]"):
            ref = ("guest_memfd", File("guest_memfd", f"fd{fd}"))
        if ref:
            proc.fds[fd] = ref
        return ref

    def new_vm(self, proc: Proc, vm_type: int) -> VmModel:
        """A VM created by (or first seen in) ``proc``."""
        vm = VmModel(len(self.vms), vm_type, self._warn)
        self.vms.append(vm)
        proc.vms.append(vm)
        return vm

    # --- syscalls ---------------------------------------------------------------------------

    def entry(self, tid: int, proc: Proc, nr: int, args: tuple[int, ...]) -> None:
        """Syscall entry: only KVM_RUN (the time it went in, the checks before it) and
        KVM_PRE_FAULT_MEMORY (the range asked for, before KVM advances it) need it."""
        if nr == d.NR_IOCTL and args[1] == uapi.KVM_PRE_FAULT_MEMORY:  # KVM rewrites it: keep the request
            self.requests[tid] = d.read_struct(proc.pid, args[2], uapi.kvm_pre_fault_memory)
        elif nr == d.NR_IOCTL and args[1] == _KVM_RUN:
            ref = proc.fds.get(args[0]) or self.classify(proc, args[0])
            if ref and ref[0] == "vcpu":
                v: Vcpu = ref[1]
                t = self.now()
                if v.left is not None:
                    v.time_in_vmm += t - v.left
                v.tid_in_run, v.entered = tid, t
                self._tid = tid
                v.vm.run_entry(v)

    def exit(self, tid: int, proc: Proc, nr: int, args: tuple[int, ...], ret: int) -> None:
        """Syscall exit with its return value (negative errno on failure)."""
        self.syscalls += 1
        self._tid = tid
        if nr == d.NR_IOCTL:
            if d.is_kvm_ioctl(args[1]):
                ioctls.ioctl(self, tid, proc, args, ret)
        elif nr in _OPEN:
            if ret >= 0:
                proc.fds.pop(ret, None)
                self.classify(proc, ret)
        elif nr in _DUP or (nr == _NR_FCNTL and args[1] in (d.F_DUPFD, d.F_DUPFD_CLOEXEC)):
            if ret >= 0 and (ref := proc.fds.get(args[0])):
                proc.fds[ret] = ref
            elif ret >= 0:
                proc.fds.pop(ret, None)
        elif nr == _NR_CLOSE:
            if (ref := proc.fds.pop(args[0], None)) and ret == 0:
                what, vm = _fd_name(ref)
                self.emit(tid, proc, "memory", f"close({args[0]}) {what}", vm, fd=args[0], call="close", what=what)
        elif nr == _NR_CLOSE_RANGE:
            if ret == 0 and not args[2] & 4:  # CLOSE_RANGE_CLOEXEC only marks them
                for fd in [f for f in proc.fds if args[0] <= f <= args[1]]:
                    del proc.fds[fd]
        elif nr == _NR_MEMFD:
            if ret >= 0:
                name = _read_cstr(proc.pid, args[0])
                proc.fds[ret] = ("memfd", File("memfd", name))
                self.emit(
                    tid,
                    proc,
                    "memory",
                    f"memfd_create({name!r}, {args[1]:#x}) = {ret}",
                    call="memfd_create",
                    name=name,
                    fd=ret,
                )
        elif nr == _NR_MMAP:
            if not -4096 < ret < 0:
                self._mmap(tid, proc, args, ret & (2**64 - 1))
        elif nr in (_NR_MUNMAP, _NR_MADVISE):
            if ret == 0:
                self._unmap(tid, proc, nr, args)
        elif nr == _NR_FALLOCATE:
            self._fallocate(tid, proc, args, ret)

    def _mmap(self, tid: int, proc: Proc, args: tuple[int, ...], addr: int) -> None:
        ref = proc.fds.get(args[4] & 0xFFFFFFFF) if args[4] & 0xFFFFFFFF != 0xFFFFFFFF else None
        if not ref:
            return
        kind, obj = ref
        length, off = args[1], args[5]
        if kind == "vcpu" and off == 0:
            obj.run_addr = addr
            self.emit(
                tid,
                proc,
                "memory",
                f"vm{obj.vm.index}/vcpu{obj.index} mmap kvm_run at {addr:#x} ({d.size(length)})",
                obj.vm,
                call="mmap",
                hva=addr,
                length=length,
            )
        elif kind in ("memfd", "guest_memfd"):
            obj.maps.append((addr, length, off))
            shared = "shared" if args[3] & d.MAP_SHARED else "private"
            self.emit(
                tid,
                proc,
                "memory",
                f"mmap {kind} {obj.name}+{off:#x} {d.size(length)} {shared} at {addr:#x}",
                obj.vm,
                call="mmap",
                file=obj.name,
                hva=addr,
                length=length,
                offset=off,
            )

    def _unmap(self, tid: int, proc: Proc, nr: int, args: tuple[int, ...]) -> None:
        addr, length = args[0], args[1]
        end = addr + length
        if nr == _NR_MADVISE:
            advice = d.MADV_NAMES.get(args[2])
            if advice not in ("MADV_DONTNEED", "MADV_REMOVE"):
                return
            call = f"madvise({addr:#x}, {d.size(length)}, {advice})"
        else:
            call = f"munmap({addr:#x}, {d.size(length)})"
            for _, ref in proc.fds.items():
                if ref[0] in ("memfd", "guest_memfd"):
                    ref[1].maps[:] = [m for m in ref[1].maps if not (addr <= m[0] and m[0] + m[1] <= end)]
        for vm in proc.vms:
            ranges = [(lo, hi) for _, lo, hi in vm.hva_to_gpa(addr, end)]
            for lo, hi in ranges:
                vm.discard(lo, hi, private=False, count=nr == _NR_MADVISE)
            if ranges:
                gpas = ", ".join(f"[{lo:#x}, {hi:#x})" for lo, hi in ranges)
                self.emit(
                    tid,
                    proc,
                    "memory",
                    f"vm{vm.index} {call}: shared {gpas} discarded",
                    vm,
                    call=call.split("(")[0],
                    hva=addr,
                    length=length,
                    shared=ranges,
                )

    def _fallocate(self, tid: int, proc: Proc, args: tuple[int, ...], ret: int) -> None:
        ref = proc.fds.get(args[0])
        if not ref or ref[0] not in ("memfd", "guest_memfd"):
            return
        kind, f = ref
        mode, off, length = args[1], args[2], args[3]
        punch = bool(mode & d.FALLOC_FL_PUNCH_HOLE)
        what = "PUNCH_HOLE" if punch else "allocate"
        text = (
            f"fallocate({kind} {f.name}, {what}, {off:#x}, {d.size(length)}) = {ret if ret >= 0 else d.errname(-ret)}"
        )
        data: dict[str, Any] = {
            "call": "fallocate",
            "file": f.name,
            "file_kind": kind,
            "mode": mode,
            "offset": off,
            "length": length,
            "ret": ret,
        }
        vm: VmModel | None = f.vm
        if ret == 0:
            end = off + length
            private = []
            if kind == "guest_memfd" and f.vm:
                for _, lo, hi in f.vm.gmem_to_gpa(f, off, end):
                    f.vm.discard(lo, hi, private=True) if punch else f.vm.allocate_private(lo, hi)
                    private.append((lo, hi))
            shared = []
            if punch:
                for hva, hva_end in f.hva_ranges(off, end):
                    for m in proc.vms:
                        for _, lo, hi in m.hva_to_gpa(hva, hva_end):
                            m.discard(lo, hi, private=False)
                            shared.append((lo, hi))
                            vm = vm or m
            if private:
                text += f" -> private {_ranges(private)}" + (" discarded" if punch else " allocated")
            if shared:
                text += f" -> shared {_ranges(shared)} discarded"
            data.update(private=private, shared=shared)
        self.emit(tid, proc, "memory", (f"vm{vm.index} " if vm else "") + text, vm, **data)


def _fd_name(ref: FdRef) -> tuple[str, VmModel | None]:
    """What an fd refers to, as the event lines name it, and its VM."""
    kind, obj = ref
    if kind == "kvm":
        return "/dev/kvm", None
    if kind == "vm":
        return f"vm{obj.index}", obj
    if kind == "vcpu":
        return f"vm{obj.vm.index}/vcpu{obj.index}", obj.vm
    return f"{kind} {obj.name}", obj.vm


def _ranges(rs: list[tuple[int, int]]) -> str:
    return ", ".join(f"[{lo:#x}, {hi:#x})" for lo, hi in rs)


def _read_cstr(pid: int, addr: int, limit: int = 256) -> str:
    try:
        raw = syscalls.process_vm_readv(pid, addr, limit)
    except OSError:
        try:  # the string may end near a page end: read up to it
            raw = syscalls.process_vm_readv(pid, addr, 4096 - addr % 4096)
        except OSError:
            return "?"
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def _vcpu_mapping(pid: int, index: int) -> int | None:
    """Where an already running process mapped vCPU ``index``'s kvm_run (/proc/PID/maps)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                if line.rstrip().endswith(f"anon_inode:kvm-vcpu:{index}"):
                    return int(line.split("-", 1)[0], 16)
    except OSError:
        pass
    return None
