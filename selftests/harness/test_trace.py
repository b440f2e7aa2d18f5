"""`vmm trace` on real programs: vmm's own runs (compared with what vmm says it did), real QEMU up
to SeaBIOS, the kernel's C private-memory selftests (nested). Bad input: test_trace_bad_input.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from vmm import Kvm
from vmm.guest.layout import UCALL_PORT
from vmm.paths import cache_dir
from vmm.tools.pytest_plugin import require

from helpers import kernel_version
from helpers import run_vmm as vmm

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORKLOAD = HERE / "trace_workload.py"
DEBUGCON = 0x402  # SeaBIOS prints its log there: an IO exit per byte


def trace(
    tmp_path: Path, *command: str, options: tuple[str, ...] = (), timeout: float = 300
) -> tuple[subprocess.CompletedProcess[str], list[dict], dict]:
    """`vmm trace --json` of ``command``: the process, its events, its summary object."""
    out = tmp_path / "trace.json"
    proc = vmm("trace", "--json", str(out), "-q", *options, "--", *command, timeout=timeout)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines and lines[-1]["type"] == "summary"
    return proc, lines[:-1], lines[-1]


def calls(events: list[dict], name: str, ok: bool = True) -> list[dict]:
    """The events of one call (e.g. KVM_SET_MEMORY_ATTRIBUTES), successful ones only by default."""
    return [e for e in events if e.get("call") == name and (not ok or e.get("ret", 0) >= 0)]


def exits(events: list[dict], reason: str) -> list[dict]:
    return [e for e in events if e.get("exit", {}).get("reason") == reason]


def state(pid: int) -> tuple[str, int]:
    """(State letter, TracerPid) of a process."""
    fields = dict(ln.split(":\t", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in ln)
    return fields["State"][0], int(fields["TracerPid"])


@contextmanager
def sleeper(*wrapper: str) -> Iterator[int]:
    """A `sleep 60` (optionally under ``wrapper``, e.g. strace), killed at the end; yields its pid."""
    p = subprocess.Popen([*wrapper, "sleep", "60"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pid = p.pid
        if wrapper:  # the sleep is the wrapper's child
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                kids = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
                if kids and Path(f"/proc/{kids[0]}/comm").read_text().strip() == "sleep":
                    pid = int(kids[0])
                    break
                time.sleep(0.05)
        yield pid
    finally:
        p.kill()
        p.wait()


def wait_for(path: Path, text: str, timeout: float = 30) -> str:
    """Poll a growing output file until it holds ``text``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {path} after {timeout}s: {content[-2000:]}")


# --- (a) vmm's own runs -------------------------------------------------------------------------


@pytest.mark.host_only
def test_trace_vmm_exit_run(kvm: Kvm, tmp_path: Path) -> None:
    """Tracing vmm running the exit benchmark guest shows exactly vmm's memslots and one decoded
    IO exit (the ucall port) per exit vmm counted, in one VM of the default type."""
    proc, events, summary = trace(tmp_path, sys.executable, str(WORKLOAD), "exits", "25")
    assert proc.returncode == 0, proc.stderr
    truth = json.loads(proc.stdout.strip().splitlines()[-1])
    (vm,) = [v for v in summary["vms"] if v["vcpus"]]
    assert vm["type"] == "KVM_X86_DEFAULT_VM"
    slots = [e["args"] for e in events if e.get("call", "").startswith("KVM_SET_USER_MEMORY_REGION") and e["ret"] == 0]
    assert [(s["slot"], s["guest_phys_addr"], s["memory_size"], s["flags"]) for s in slots] == [
        (m["slot"], m["gpa"], m["size"], m["flags"]) for m in truth["memslots"]
    ]
    io = exits(events, "IO")
    assert len(io) == truth["exits"]["IO"] == 26 and truth["exits"] == {"IO": 26}
    assert {(e["exit"]["port"], e["exit"]["is_write"], e["exit"]["size"]) for e in io} == {(UCALL_PORT, True, 1)}
    assert vm["vcpus"][0]["exits"] == {"IO": 26}
    assert not vm["stats"]["warnings"]


@pytest.mark.private_mem
def test_trace_vmm_conversions(private_kvm: Kvm, tmp_path: Path) -> None:
    """Tracing vmm's conversion sweep shows, per MAP_GPA_RANGE exit, exactly what vmm's Converter
    did: KVM_SET_MEMORY_ATTRIBUTES of that page, then PUNCH_HOLE of the side no longer used; the
    byte counts agree with the Converter's and the model finds no double allocation."""
    size = 16 * 4096
    proc, events, summary = trace(tmp_path, sys.executable, str(WORKLOAD), "convert", str(size))
    assert proc.returncode == 0, proc.stderr
    truth = json.loads(proc.stdout.strip().splitlines()[-1])
    (vm,) = [v for v in summary["vms"] if v["vcpus"]]
    assert vm["type"] == "KVM_X86_SW_PROTECTED_VM"
    hypercalls = exits(events, "HYPERCALL")
    assert len(hypercalls) == truth["exits"]["HYPERCALL"] == 2 * size // 4096
    base = truth["data_gpa"]
    expected = [(base + i * 4096, True) for i in range(16)] + [(base + i * 4096, False) for i in range(16)]
    assert [(h["exit"]["map_gpa_range"]["gpa"], h["exit"]["map_gpa_range"]["private"]) for h in hypercalls] == expected
    # the sequence after each exit, in that vCPU thread: attributes, then the punch of the other side
    follow = []
    for h in hypercalls:
        i = events.index(h) + 1
        after = [
            e
            for e in events[i:]
            if e["tid"] == h["tid"] and e.get("call") in ("KVM_SET_MEMORY_ATTRIBUTES", "fallocate", "KVM_RUN")
        ]
        follow.append(tuple(e["call"] for e in after[:2]) + (after[1].get("file_kind"),))
        gpa = h["exit"]["map_gpa_range"]["gpa"]
        assert after[0]["args"]["address"] == gpa and after[0]["args"]["size"] == 4096
        side = "shared" if h["exit"]["map_gpa_range"]["private"] else "private"
        assert after[1][side] == [[gpa, gpa + 4096]]
    assert (
        follow
        == [("KVM_SET_MEMORY_ATTRIBUTES", "fallocate", "memfd")] * 16
        + [("KVM_SET_MEMORY_ATTRIBUTES", "fallocate", "guest_memfd")] * 16
    )
    st = vm["stats"]
    assert len(calls(events, "KVM_SET_MEMORY_ATTRIBUTES")) == truth["conversions"] == st["conversions"] == 32
    assert st["bytes_to_private"] == truth["bytes_to_private"] == size
    assert st["bytes_to_shared"] == truth["bytes_to_shared"] == size
    assert st["discarded_shared"] == st["discarded_private"] == size
    assert "double-allocation" not in st["warnings"], st["warnings"]


# --- (c) real QEMU ------------------------------------------------------------------------------


@pytest.mark.host_only
@pytest.mark.slow
def test_trace_qemu_memslots(kvm: Kvm, tmp_path: Path) -> None:
    """QEMU (pc machine, 64M, SeaBIOS) traced until SeaBIOS's boot menu: its memslots as the model
    holds them are 64M of RAM from one host block (hva - gpa constant) and the 256K BIOS image,
    read-only, just below 4G; SeaBIOS's own log arrives decoded through the IO exits of port 0x402."""
    qemu = shutil.which(os.environ.get("VMM_QEMU", "qemu-system-x86_64"))
    require(qemu is not None, "qemu-system-x86_64")
    assert qemu
    bios = Path("/usr/share/seabios/bios-256k.bin")
    require(bios.exists(), str(bios))
    out = tmp_path / "qemu.json"
    # -cpu host aborts here on kvm_pvm ("failed to set MSR 0x10a"); max (all KVM can do) works
    # SeaBIOS logs to port 0x402 only when a debugcon answers there (it reads the port back)
    debugcon = tmp_path / "seabios.log"
    cmd = [qemu, "-accel", "kvm", "-cpu", "max", "-m", "64M", "-display", "none", "-nodefaults", "-no-reboot"]
    cmd += ["-chardev", f"file,id=d,path={debugcon}", "-device", "isa-debugcon,iobase=0x402,chardev=d"]
    tracer = subprocess.Popen(
        [sys.executable, "-m", "vmm", "trace", "-q", "--json", str(out), "--", *cmd],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    log, qemu_pid, deadline = b"", 0, time.monotonic() + 120
    try:
        while time.monotonic() < deadline and b"No bootable device" not in log:
            time.sleep(0.2)
            if not out.exists():
                continue
            log = b""
            for line in out.read_text().splitlines():
                try:
                    e = json.loads(line)
                except ValueError:
                    break  # the last line is being written
                qemu_pid = qemu_pid or e["pid"]
                x = e.get("exit", {})
                if x.get("reason") == "IO" and x["port"] == DEBUGCON and x["is_write"]:
                    log += bytes.fromhex(x["data"])
        assert b"SeaBIOS (version" in log and b"No bootable device" in log, log[-500:]
    finally:
        if qemu_pid:
            os.kill(qemu_pid, signal.SIGKILL)
        _, err = tracer.communicate(timeout=60)
    assert debugcon.read_bytes().startswith(log)  # what the trace decoded is what QEMU wrote out
    assert tracer.returncode == 128 + signal.SIGKILL, err
    assert "Traceback" not in err
    summary = json.loads(out.read_text().splitlines()[-1])
    assert summary["processes"][0]["end"] == "killed by SIGKILL"
    (vm,) = summary["vms"]
    ram = [m for m in vm["memslots"] if m["flags"] == "0"]
    rom = [m for m in vm["memslots"] if m["flags"] == "READONLY"]
    covered = sorted((m["gpa"], m["gpa"] + m["size"]) for m in ram)
    assert covered[0][0] == 0 and covered[-1][1] == 64 << 20
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:])), covered  # contiguous: no hole
    assert len({m["hva"] - m["gpa"] for m in ram}) == 1  # one RAM block, mapped in order
    bios_slot = [m for m in rom if m["gpa"] + m["size"] == 1 << 32]
    assert len(bios_slot) == 1 and bios_slot[0]["size"] == bios.stat().st_size
    assert vm["vcpus"][0]["exits"]["IO"] >= len(log)


# --- (b) the kernel's C selftests, nested -------------------------------------------------------


def c_test(name: str) -> Path:
    """A C selftest built by scripts/build-kernel-selftests for the running kernel's version
    (inside `vmm nested` HOME is /tmp: $VMM_HOST_CACHE_DIR names the host's cache)."""
    base = Path(os.environ.get("VMM_HOST_CACHE_DIR") or cache_dir())
    major, minor = kernel_version()
    path = base / ("kselftests" if (major, minor) < (7, 0) else f"kselftests-{major}.{minor}") / name
    require(path.exists(), f"{path} (scripts/build-kernel-selftests)")
    return path


@pytest.mark.private_mem
def test_trace_c_private_mem_conversions(private_kvm: Kvm, tmp_path: Path) -> None:
    """The kernel's private_mem_conversions_test (1 vCPU, 1 memslot) as its source says it runs:
    52 MAP_GPA_RANGE exits (2 x 15 explicit conversions, 2 x 11 in the punch-hole test), 25 ucall
    IO exits (2 x 12 SYNCs and the DONE), 32 KVM_SET_MEMORY_ATTRIBUTES from the hypercall handler,
    and 42 fallocate() calls on the guest_memfd: 40 from vm_guest_mem_fallocate (35 PUNCH_HOLE,
    5 allocate) and the final punch and allocate after the VM is freed."""
    proc, events, summary = trace(tmp_path, str(c_test("private_mem_conversions_test")))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (vm,) = [v for v in summary["vms"] if v["vcpus"]]
    assert vm["type"] == "KVM_X86_SW_PROTECTED_VM"
    hypercalls = exits(events, "HYPERCALL")
    assert len(hypercalls) == 52 and all("map_gpa_range" in h["exit"] for h in hypercalls)
    assert len(exits(events, "IO")) == 25
    # KVM_RUN also returns -EINTR here now and then (counted as INTR): vcpu_run() retries it
    assert {k: n for k, n in vm["vcpus"][0]["exits"].items() if k != "INTR"} == {"HYPERCALL": 52, "IO": 25}
    assert len(calls(events, "KVM_SET_MEMORY_ATTRIBUTES")) == 32
    falloc = [e for e in calls(events, "fallocate") if e["file_kind"] == "guest_memfd"]
    punches = [e for e in falloc if e["mode"] & 2]
    assert (len(falloc), len(punches)) == (42, 36)
    # the first punch of the run: the whole per-vCPU range, [4G, +2M+4K), through the one binding
    assert punches[0]["private"] == [[1 << 32, (1 << 32) + (2 << 20) + 4096]]


@pytest.mark.private_mem
def test_trace_c_private_mem_kvm_exits(private_kvm: Kvm, tmp_path: Path) -> None:
    """The kernel's private_mem_kvm_exits_test: two VMs, each ending in one KVM_RUN that returns
    -1 EFAULT with a private KVM_EXIT_MEMORY_FAULT for the page at 0xc0000000, which the test never
    answers; the second sets private attributes on a memslot without guest_memfd."""
    proc, events, summary = trace(tmp_path, str(c_test("private_mem_kvm_exits_test")))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    faults = exits(events, "MEMORY_FAULT")
    assert len(faults) == 2
    for f in faults:
        assert f["ret"] == -14  # -EFAULT: strace would not show this KVM_RUN at all
        assert (f["exit"]["flags"], f["exit"]["gpa"], f["exit"]["size"]) == (8, 0xC0000000, 4096)
    vms = [v for v in summary["vms"] if v["vcpus"]]
    assert [v["type"] for v in vms] == ["KVM_X86_SW_PROTECTED_VM"] * 2
    assert [v["stats"]["warnings"].get("unresolved-fault") for v in vms] == [1, 1]
    assert "attributes-without-gmem" not in vms[0]["stats"]["warnings"]
    assert vms[1]["stats"]["warnings"].get("attributes-without-gmem") == 1


@pytest.mark.host_only
def test_doctor_reports_what_trace_needs(kvm: Kvm) -> None:
    """`vmm doctor` names the python-ptrace it found and kernel.yama.ptrace_scope as they are."""
    import importlib.metadata

    report = json.loads(vmm("doctor", "--json").stdout)["trace"]
    assert report["python_ptrace"] == importlib.metadata.version("python-ptrace")
    scope = Path("/proc/sys/kernel/yama/ptrace_scope")
    assert report["ptrace_scope"] == (int(scope.read_text()) if scope.exists() else None)
    assert f"vmm trace         python-ptrace {report['python_ptrace']}" in vmm("doctor").stdout


PRE_FAULT = """
import json
from vmm.errors import KvmError
from vmm.guest.machine import Machine
with Machine() as m:
    try:
        m.vcpus[0].pre_fault_memory(0x10000, 0x3000)
        print(json.dumps({"errno": 0}))
    except KvmError as e:
        print(json.dumps({"errno": e.errno}))
"""


@pytest.mark.host_only
def test_trace_pre_fault_memory(kvm: Kvm, tmp_path: Path) -> None:
    """KVM_PRE_FAULT_MEMORY shows the range asked for (read at syscall entry: KVM advances the
    struct as it maps) and what KVM left of it, with the return vmm got: 0 and nothing left where
    the kernel pre-faults, the errno vmm raised where it cannot (ENOTSUP on kvm_pvm)."""
    proc, events, _ = trace(tmp_path, sys.executable, "-c", PRE_FAULT)
    assert proc.returncode == 0, proc.stderr
    err = json.loads(proc.stdout.strip().splitlines()[-1])["errno"]
    pf = calls(events, "KVM_PRE_FAULT_MEMORY", ok=False)
    e = pf[0]
    assert e["fd_kind"] == "vcpu" and pf[-1]["ret"] == -err
    assert (e["args"]["requested"]["gpa"], e["args"]["requested"]["size"]) == (0x10000, 0x3000)
    if not err:  # vmm repeats the call until KVM has mapped it all
        assert pf[-1]["args"]["left"]["size"] == 0
