"""The ptrace loop: start a command or seize a running process, follow every thread and child,
stop at each syscall entry and exit, and hand them to the Session.

Built on python-ptrace's binding (its ptrace() call, traceme, syscall, detach, geteventmsg,
getsiginfo) but not its PtraceDebugger: with more than one task, PtraceDebugger._wait_event polls
every pid with WNOHANG and sleeps between rounds (1 ms doubling to 0.5 s), so a VMM with a few
vCPU threads would spend most of its time waiting for the tracer. Here one blocking
waitpid(-1, WALL) returns each stop as it happens, whichever thread it is.

Each stop is read with PTRACE_GET_SYSCALL_INFO (Linux 5.3): it says entry or exit itself, so a
task attached in the middle of a syscall (a vCPU inside KVM_RUN) cannot desynchronise the
entry/exit pairing, and one ptrace call gives the number, the six arguments or the return value."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import struct
from dataclasses import dataclass

from ptrace.binding import func as pt
from ptrace.error import PtraceError

from vmm.errors import VmmError
from vmm.kvm import syscalls

from .session import INTERESTING, Proc, Session

PTRACE_SEIZE, PTRACE_INTERRUPT, PTRACE_GET_SYSCALL_INFO = 0x4206, 0x4207, 0x420E
PTRACE_O_EXITKILL = 1 << 20
PTRACE_EVENT_STOP = 128
WALL = 0x40000000
OPTIONS = (
    pt.PTRACE_O_TRACESYSGOOD
    | pt.PTRACE_O_TRACECLONE
    | pt.PTRACE_O_TRACEFORK
    | pt.PTRACE_O_TRACEVFORK
    | pt.PTRACE_O_TRACEEXEC
)
PTRACE_O_TRACESECCOMP, PTRACE_EVENT_SECCOMP = 1 << 7, 7
SYSCALL_STOP = signal.SIGTRAP | 0x80
_OP_ENTRY, _OP_EXIT, _OP_SECCOMP = 1, 2, 3
# classic BPF and seccomp (<linux/filter.h>, <linux/seccomp.h>, <linux/audit.h>)
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_RET_K = 0x20, 0x15, 0x06
_SECCOMP_RET_ALLOW, _SECCOMP_RET_TRACE = 0x7FFF0000, 0x7FF00000
_AUDIT_ARCH_X86_64 = 0xC000003E
_STOP_SIGNALS = {signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}


class TraceError(VmmError):
    """The tracer could not start or attach (one line for the CLI)."""


class ptrace_syscall_info(ctypes.Structure):
    """<linux/ptrace.h> struct ptrace_syscall_info; the union as 8 words (entry: nr, args[6];
    exit: rval, is_error)."""

    _fields_ = [
        ("op", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("arch", ctypes.c_uint32),
        ("instruction_pointer", ctypes.c_uint64),
        ("stack_pointer", ctypes.c_uint64),
        ("data", ctypes.c_int64 * 8),
    ]


@dataclass(eq=False)
class Task:
    """One traced thread."""

    tid: int
    proc: Proc
    entry: tuple[int, tuple[int, ...]] | None = None  # (nr, args) between entry and exit
    fresh: bool = True  # its first stop is the attach stop, not a signal to deliver
    stopped: bool = False


class Tracer:
    """Follows one command or one running process, and every thread and child it makes."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.tasks: dict[int, Task] = {}
        self.procs: dict[int, Proc] = {}
        self.attached = False  # -p: detach (not kill) at the end
        self.leader = 0
        self.status = 0  # the leader's exit status, shell style (128+N when killed by signal N)
        self._info = ptrace_syscall_info()
        self._info_addr = ctypes.addressof(self._info)
        self._detach_requested = False
        self.seccomp = False  # stops only at the filtered syscalls (PTRACE_CONT between them)

    # --- starting ---------------------------------------------------------------------------

    def spawn(self, argv: list[str], seccomp: bool = True) -> int:
        """Fork, PTRACE_TRACEME, stop, exec ``argv``; returns the child's pid (traced, running).

        With ``seccomp`` (strace's --seccomp-bpf) the child installs a seccomp filter before exec
        that stops it only at the syscalls the Session decodes: the others run at full speed (a
        Python VMM makes thousands of stat/read calls while starting, QEMU polls constantly)."""
        path = shutil.which(argv[0])
        if path is None:
            raise TraceError(f"{argv[0]}: command not found")
        pid = os.fork()
        if pid == 0:  # the child: nothing here may raise into the tracer's code
            try:
                for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
                    signal.signal(s, signal.SIG_DFL)
                pt.ptrace_traceme()
                os.kill(os.getpid(), signal.SIGSTOP)  # the tracer sets its options meanwhile
                if seccomp:  # after the stop: a SECCOMP_RET_TRACE without PTRACE_O_TRACESECCOMP is ENOSYS
                    syscalls.seccomp_filter(_filter(sorted(INTERESTING)))
                os.execv(path, argv)
            except BaseException as e:  # noqa: BLE001 - report and leave, whatever it was
                os.write(2, f"vmm trace: {argv[0]}: {e}\n".encode())
            os._exit(127)
        try:  # until EXITKILL is set, a tracer dying here would leave the child stopped
            _, status = os.waitpid(pid, WALL)
            if not os.WIFSTOPPED(status):
                raise TraceError(f"{argv[0]}: the child died before exec")
            pt.ptrace(pt.PTRACE_SETOPTIONS, pid, 0, OPTIONS | PTRACE_O_EXITKILL | PTRACE_O_TRACESECCOMP)
            self.seccomp = seccomp
        except BaseException:
            os.kill(pid, signal.SIGKILL)
            raise
        proc = self.procs[pid] = self.session.new_process(pid, " ".join(argv))
        task = self.tasks[pid] = Task(pid, proc, fresh=False)
        self.leader = pid
        self._resume(task)
        return pid

    def attach(self, pid: int) -> None:
        """PTRACE_SEIZE every thread of ``pid`` (looping until no new one appears), then interrupt them."""
        if not os.path.isdir(f"/proc/{pid}"):
            raise TraceError(f"no process {pid}")
        if pid == os.getpid():
            raise TraceError(f"process {pid} is this tracer")
        self.attached, self.leader = True, pid
        proc = self.procs[pid] = self.session.new_process(pid, _comm(pid))
        seen: set[int] = set()
        while True:
            try:
                tids = {int(t) for t in os.listdir(f"/proc/{pid}/task")} - seen
            except OSError:
                raise TraceError(f"process {pid} exited while attaching") from None
            if not tids:
                break
            for tid in sorted(tids):
                try:
                    pt.ptrace(PTRACE_SEIZE, tid, 0, OPTIONS)
                except PtraceError as e:
                    if tid == pid or e.errno != 3:  # ESRCH on a thread that just exited is fine
                        self.detach_all()
                        raise TraceError(_attach_refusal(pid, e.errno)) from None
                    continue
                self.tasks[tid] = Task(tid, proc)
                pt.ptrace(PTRACE_INTERRUPT, tid)
            seen |= tids
        self.session.process_event(
            pid, proc, f"attached to {pid} ({proc.command}), {len(self.tasks)} thread(s)", event="attach"
        )

    # --- the loop ---------------------------------------------------------------------------

    def request_detach(self, signum: int, frame: object) -> None:
        """Signal handler (-p): stop tracing. It must not raise out of a waitpid (a stop that call
        already returned would be lost, its task left stopped), so it interrupts the tasks: a stop
        ends the wait, and the loop sees the flag."""
        self._detach_requested = True
        for tid in list(self.tasks):
            try:
                pt.ptrace(PTRACE_INTERRUPT, tid)
            except PtraceError:
                pass

    def run(self) -> int:
        """Trace until every task is gone (or, attached, until asked to detach); the exit status."""
        try:
            while self.tasks and not self._detach_requested:
                try:
                    tid, status = os.waitpid(-1, WALL)
                except ChildProcessError:
                    break
                self._handle(tid, status)
        finally:
            if self.tasks:
                self.detach_all()
        return self.status

    def _handle(self, tid: int, status: int) -> None:
        task = self.tasks.get(tid)
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            self._gone(tid, task, status)
            return
        if not os.WIFSTOPPED(status):
            return
        if task is None:
            task = self._adopt(tid)
        task.stopped = True
        sig, event = os.WSTOPSIG(status), status >> 16
        if sig == SYSCALL_STOP:
            self._syscall(task)
            self._resume(task)
        elif sig == signal.SIGTRAP and event == PTRACE_EVENT_SECCOMP:
            self._syscall(task)  # an entry: resumed with PTRACE_SYSCALL for its exit
            self._resume(task)
        elif sig == signal.SIGTRAP and event:
            self._event(task, event)
            self._resume(task)
        elif task.fresh and sig == signal.SIGSTOP:  # the auto-attach stop of a new child (not seized)
            task.fresh = False
            self._resume(task)
        else:  # a signal for the tracee: deliver it (a group-stop has no siginfo: just resume)
            deliver = sig
            if sig in _STOP_SIGNALS:
                try:
                    pt.ptrace_getsiginfo(tid)
                except PtraceError:
                    deliver = 0
            self._resume(task, deliver)

    def _syscall(self, task: Task) -> None:
        try:
            pt.ptrace(PTRACE_GET_SYSCALL_INFO, task.tid, ctypes.sizeof(self._info), self._info_addr)
        except PtraceError:
            return
        info = self._info
        if info.op in (_OP_ENTRY, _OP_SECCOMP):
            nr, args = info.data[0], tuple(a & 0xFFFFFFFFFFFFFFFF for a in info.data[1:7])
            task.entry = (nr, args)
            self.session.entry(task.tid, task.proc, nr, args)
        elif info.op == _OP_EXIT and task.entry is not None:
            nr, args = task.entry
            task.entry = None
            self.session.exit(task.tid, task.proc, nr, args, info.data[0])

    def _event(self, task: Task, event: int) -> None:
        task.fresh = False
        if event in (pt.PTRACE_EVENT_FORK, pt.PTRACE_EVENT_VFORK, pt.PTRACE_EVENT_CLONE):
            new = pt.ptrace_geteventmsg(task.tid)
            if new not in self.tasks:
                self._adopt(new)
        elif event == pt.PTRACE_EVENT_EXEC:
            former = pt.ptrace_geteventmsg(task.tid)
            for t in [t for t in self.tasks.values() if t.proc is task.proc and t.tid != task.tid]:
                del self.tasks[t.tid]  # the other threads are gone (a non-leader exec took the leader's tid)
            if former != task.tid:
                self.tasks.pop(former, None)
            task.entry = None
            self.session.exec(task.tid, task.proc, _exe(task.tid))
        # PTRACE_EVENT_STOP: the attach interrupt or a group-stop (we resume it: job control is not kept)

    def _adopt(self, tid: int) -> Task:
        """A task first seen now (a new thread or child, maybe before its creator's event)."""
        tgid, ppid = _ids(tid)
        proc = self.procs.get(tgid)
        if proc is None:
            parent = self.procs.get(ppid)
            proc = self.procs[tgid] = self.session.new_process(tgid, _comm(tgid), parent)
            self.session.process_event(tid, proc, f"new process {tgid} (parent {ppid})", event="fork", parent=ppid)
        task = self.tasks[tid] = Task(tid, proc)
        return task

    def _gone(self, tid: int, task: Task | None, status: int) -> None:
        if task is None:
            return
        del self.tasks[tid]
        proc = task.proc
        if tid != proc.pid:
            return
        if os.WIFEXITED(status):
            code = os.WEXITSTATUS(status)
            proc.end, shell = f"exited with status {code}", code
        else:
            sig = os.WTERMSIG(status)
            proc.end, shell = f"killed by {signal.Signals(sig).name}", 128 + sig
        if tid == self.leader:
            self.status = shell
        self.session.process_event(tid, proc, f"process {tid} {proc.end}", event="exit", status=shell)

    def _resume(self, task: Task, sig: int = 0) -> None:
        """Continue to the next syscall stop; under the seccomp filter, to the next filtered
        syscall (PTRACE_CONT) unless this one's exit is still to come."""
        try:
            if self.seccomp and task.entry is None:
                pt.ptrace_cont(task.tid, sig)
            else:
                pt.ptrace_syscall(task.tid, sig)
            task.stopped = False
        except PtraceError:  # killed meanwhile: its exit comes through waitpid
            pass

    # --- leaving ----------------------------------------------------------------------------

    def detach_all(self) -> None:
        """Detach from every task, leaving it running: interrupt the running ones, wait for each
        to stop, then PTRACE_DETACH (a pending signal goes with it)."""
        for t in self.tasks.values():
            if not t.stopped:
                try:
                    pt.ptrace(PTRACE_INTERRUPT, t.tid)
                except PtraceError:
                    pass
        while any(not t.stopped for t in self.tasks.values()):
            try:
                tid, status = os.waitpid(-1, WALL)
            except ChildProcessError:
                break
            task = self.tasks.get(tid)
            if task is None:
                continue
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                self._gone(tid, task, status)
                continue
            task.stopped = True
            sig, event = os.WSTOPSIG(status), status >> 16
            pending = 0 if sig in (SYSCALL_STOP, signal.SIGTRAP) or event else sig
            self._detach(task, pending)
        for t in list(self.tasks.values()):
            self._detach(t, 0)
        if self.attached and self.leader in self.procs:
            p = self.procs[self.leader]
            if p.end == "running":
                p.end = "detached, still running"

    def _detach(self, task: Task, sig: int) -> None:
        try:
            pt.ptrace_detach(task.tid, sig)
        except PtraceError:
            pass
        self.tasks.pop(task.tid, None)


def _filter(nrs: list[int]) -> bytes:
    """A seccomp program: SECCOMP_RET_TRACE for the x86-64 syscalls ``nrs``, ALLOW for the rest."""
    n = len(nrs)
    ins = [(_BPF_LD_W_ABS, 0, 0, 4), (_BPF_JEQ_K, 0, n + 1, _AUDIT_ARCH_X86_64), (_BPF_LD_W_ABS, 0, 0, 0)]
    ins += [(_BPF_JEQ_K, n - i, 0, nr) for i, nr in enumerate(nrs)]
    ins += [(_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW), (_BPF_RET_K, 0, 0, _SECCOMP_RET_TRACE)]
    return b"".join(struct.pack("<HBBI", *i) for i in ins)


def _status_fields(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/status") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return {}


def _ids(tid: int) -> tuple[int, int]:
    s = _status_fields(tid)
    return int(s.get("Tgid", tid)), int(s.get("PPid", 0))


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip() or _status_fields(pid).get(
                "Name", "?"
            )
    except OSError:
        return "?"


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return "?"


def _attach_refusal(pid: int, err: int | None) -> str:
    """Why PTRACE_SEIZE failed, in one line."""
    if err == 3:
        return f"no process {pid}"
    tracer = int(_status_fields(pid).get("TracerPid", "0"))
    if tracer:
        return f"cannot trace process {pid}: already traced by process {tracer} ({_comm(tracer)})"
    scope = ""
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = f", kernel.yama.ptrace_scope={f.read().strip()}"
    except OSError:
        pass
    return f"cannot trace process {pid}: {os.strerror(err or 1)} (another user's process, or not a descendant{scope})"
