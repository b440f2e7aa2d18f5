"""The KVM ioctls a tracee makes, decoded on the fd kind they were issued on: the VMs, vCPUs and
guest_memfds they create go into the process's fd table, memslots and attributes into the VM
model, KVM_RUN's exit (read from the tracee's kvm_run) into the vCPU's counters."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from vmm.kvm import uapi
from vmm.kvm.exits import Exit, MemoryFaultExit
from vmm.kvm.uapi import GmemFlag, MemFlag

from . import decode as d
from .model import File, Slot, Vcpu, VmModel

if TYPE_CHECKING:
    from .session import Proc, Session

_RUN_ERRORS = (errno.EFAULT, 133)  # EFAULT, EHWPOISON (133; Python has no name): KVM_RUN -1 with MEMORY_FAULT


def ioctl(ses: Session, tid: int, proc: Proc, args: tuple[int, ...], ret: int) -> None:
    """One KVM ioctl (``args``: fd, request, argument) that returned ``ret``."""
    fd, req, arg = args[0], args[1], args[2]
    ref = proc.fds.get(fd) or ses.classify(proc, fd)
    if ref is None:
        return
    kind, obj = ref
    if req == uapi.KVM_RUN and kind == "vcpu":
        _run(ses, tid, proc, obj, ret)
        return
    name = d.ioctl_name(req)
    fields: dict[str, Any] = {}
    cls = d.ARG_STRUCTS.get(req)
    s = d.read_struct(proc.pid, arg, cls) if cls else None
    if s is not None:
        fields = d.struct_fields(s)
    text = d.arg_text(req, fields) if fields else ""
    vm: VmModel | None = obj if kind == "vm" else obj.vm if kind in ("vcpu", "guest_memfd") else None
    also = None
    if req == uapi.KVM_CHECK_EXTENSION:
        text = f"{d.cap_name(arg)}"
        fields = {"cap": d.cap_name(arg)}
    elif req == uapi.KVM_CREATE_VM:
        text, fields = d.vm_type_name(arg), {"type": d.vm_type_name(arg)}
        if ret >= 0:
            vm = ses.new_vm(proc, arg)
            proc.fds[ret] = ("vm", vm)
    elif req == uapi.KVM_CREATE_VCPU and kind == "vm":
        text, fields = f"id={arg}", {"id": arg}
        if ret >= 0:
            v = Vcpu(obj, arg)
            obj.vcpus.append(v)
            proc.fds[ret] = ("vcpu", v)
    elif req == uapi.KVM_CREATE_GUEST_MEMFD and kind == "vm" and ret >= 0 and s is not None:
        g = File("guest_memfd", f"vm{obj.index}/gmem{len(obj.gmems)}", fields["size"], fields["flags"], obj)
        obj.gmems.append(g)
        proc.fds[ret] = ("guest_memfd", g)
        text += f" -> {g.name}"
    elif req in (uapi.KVM_SET_USER_MEMORY_REGION, uapi.KVM_SET_USER_MEMORY_REGION2) and kind == "vm" and s is not None:
        also = "memory"
        if ret == 0:
            _memslot(tid, proc, obj, fields)
    elif req == uapi.KVM_SET_MEMORY_ATTRIBUTES and kind == "vm" and s is not None:
        also = "memory"
        if ret == 0:
            to_p, to_s = obj.set_attributes(fields["address"], fields["size"], fields["attributes"])
            text += (
                f" (converted {d.size(to_p)} to private)"
                if to_p
                else f" (converted {d.size(to_s)} to shared)"
                if to_s
                else " (no change)"
            )
    elif req == uapi.KVM_PRE_FAULT_MEMORY:
        also = "memory"
        asked = ses.requests.pop(tid, None)
        if asked is not None:  # what was asked, then what KVM left to do (size 0: all mapped)
            fields = {"requested": d.struct_fields(asked), "left": fields}
            text = f"gpa={asked.gpa:#x} size={d.size(asked.size)} -> left size={d.size(fields['left'].get('size', 0))}"
    result = (
        d.errname(-ret) if ret < 0 else ("" if kind == "kvm" and req != uapi.KVM_CHECK_EXTENSION else "") + str(ret)
    )
    where = f"vm{vm.index}" if vm else "kvm"
    if kind == "vcpu":
        where += f"/vcpu{obj.index}"
    ses.emit(
        tid,
        proc,
        "kvm",
        f"{where} {name}({text}) = {result}",
        vm,
        also,
        call=name,
        fd=fd,
        fd_kind=kind,
        args=fields,
        ret=ret,
    )


def _memslot(tid: int, proc: Proc, vm: VmModel, f: dict[str, Any]) -> None:
    flags = f["flags"]
    gmem: File | None = None
    if flags & MemFlag.GUEST_MEMFD:
        ref = proc.fds.get(f["guest_memfd"])
        gmem = ref[1] if ref and ref[0] == "guest_memfd" else None
    hva = f["userspace_addr"]
    in_place = bool(gmem and gmem.flags & GmemFlag.MMAP and any(h <= hva < h + n for h, n, _ in gmem.maps))
    running = [v.index for v in vm.vcpus if v.tid_in_run is not None and v.tid_in_run != tid]
    slot = Slot(
        f["slot"],
        flags,
        f["guest_phys_addr"],
        f["memory_size"],
        hva,
        gmem,
        f.get("guest_memfd_offset", 0),
        in_place,
    )
    vm.set_memory_region(slot, running)


def _run(ses: Session, tid: int, proc: Proc, v: Vcpu, ret: int) -> None:
    t = ses.now()
    if v.tid_in_run is not None:
        v.time_in_run += t - v.entered
    v.tid_in_run, v.left = None, t
    where = f"vm{v.vm.index}/vcpu{v.index}"
    e: Exit | None = None
    if v.run_addr is not None and (ret == 0 or -ret in _RUN_ERRORS):
        e = d.read_exit(proc.pid, v.run_addr)
        if ret < 0 and not isinstance(e, MemoryFaultExit):
            e = None
    if e is None:
        result = d.errname(-ret) if ret < 0 else str(ret)
        v.exits["INTR" if ret == -errno.EINTR else "error" if ret < 0 else "unknown"] += 1
        ses.emit(tid, proc, "exits", f"{where} KVM_RUN = {result}", v.vm, call="KVM_RUN", vcpu=v.index, ret=ret)
        return
    v.vm.run_exit(v, e)
    result = d.errname(-ret) if ret < 0 else "0"
    ses.emit(
        tid,
        proc,
        "exits",
        f"{where} KVM_RUN = {result}: {d.exit_text(e)}",
        v.vm,
        call="KVM_RUN",
        vcpu=v.index,
        ret=ret,
        exit=e,
    )
