"""`vmm trace` given bad input (no command, no process, a process it may not or cannot trace), a
tracee that is killed, execs or forks, and -p with Ctrl-C: one line, a documented exit code, no
traceback, and the tracee never left stopped or traced."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_guest_images import Unprivileged, unprivileged_user
from test_trace import ROOT, WORKLOAD, sleeper, state, wait_for

from vmm import Kvm
from vmm.guest.layout import UCALL_PORT
from vmm.tools.pytest_plugin import require

from helpers import one_line_error
from helpers import run_vmm as vmm

# --- bad input, and the tracee is never left stopped ----------------------------------------------


@pytest.mark.no_kvm
def test_trace_usage_errors(tmp_path: Path) -> None:
    """No command and no -p, or both; a command that does not exist: one line, exit 2."""
    assert "give a command after -- or -p PID" in one_line_error(vmm("trace"))
    assert "give a command after -- or -p PID" in one_line_error(vmm("trace", "-p", "1", "--", "true"))
    assert "no-such-command-xyz: command not found" in one_line_error(vmm("trace", "--", "no-such-command-xyz"))
    assert "No such file or directory" in one_line_error(
        vmm("trace", "--json", str(tmp_path / "no" / "f"), "--", "true")
    )


@pytest.mark.no_kvm
def test_trace_no_such_process() -> None:
    """-p of a PID nobody has: one line naming it, exit 2."""
    pid = int(Path("/proc/sys/kernel/pid_max").read_text()) - 1
    while Path(f"/proc/{pid}").exists():
        pid -= 1
    assert f"no process {pid}" in one_line_error(vmm("trace", "-p", str(pid)))


@pytest.mark.no_kvm
def test_trace_already_traced() -> None:
    """-p of a process strace already traces: one line naming strace; the process runs on, still
    strace's."""
    strace = shutil.which("strace")
    require(strace is not None, "strace")
    with sleeper(strace or "strace", "-o", os.devnull) as pid:
        tracer = state(pid)[1]
        assert tracer and "strace" in Path(f"/proc/{tracer}/comm").read_text()
        line = one_line_error(vmm("trace", "-p", str(pid)))
        assert f"cannot trace process {pid}: already traced by process {tracer} ({strace} -o" in line
        assert state(pid) == ("S", tracer)


@pytest.fixture
def nobody() -> Iterator[Unprivileged]:
    """User nobody with a home of its own (test_guest_images.unprivileged_user)."""
    yield from unprivileged_user()


@pytest.mark.no_kvm
def test_trace_not_permitted(nobody: Unprivileged) -> None:
    """-p of root's process by user nobody: one line, exit 2, the process untouched."""
    with sleeper() as pid:
        line = one_line_error(nobody.vmm("trace", "-p", str(pid)))
        assert f"cannot trace process {pid}: Operation not permitted" in line
        assert state(pid) == ("S", 0)


@pytest.mark.no_kvm
def test_trace_tracee_killed(tmp_path: Path) -> None:
    """A tracee killed mid-trace: the tracer says so, prints its summary and exits 128+9."""
    out = tmp_path / "events"
    tracer = subprocess.Popen(
        [sys.executable, "-m", "vmm", "trace", "--summary", "-o", str(out), "--", "sleep", "60"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        text = wait_for(out, "exec ")
        pid = int(text.split("exec ")[0].split()[-2])
        os.kill(pid, signal.SIGKILL)
        _, err = tracer.communicate(timeout=30)
    finally:
        tracer.kill()
    assert tracer.returncode == 137 and "Traceback" not in err, err
    text = out.read_text()
    assert f"process {pid} killed by SIGKILL" in text
    assert "--- vmm trace summary:" in text and "no VM was created" in text


@pytest.mark.no_kvm
def test_trace_tracer_killed_takes_the_command_along(tmp_path: Path) -> None:
    """SIGKILL of the tracer of a command it started kills the command too (PTRACE_O_EXITKILL):
    nothing is left stopped and orphaned."""
    out = tmp_path / "events"
    tracer = subprocess.Popen([sys.executable, "-m", "vmm", "trace", "-o", str(out), "--", "sleep", "60"], cwd=ROOT)
    text = wait_for(out, "exec ")
    pid = int(text.split("exec ")[0].split()[-2])
    tracer.kill()
    tracer.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and state(pid)[0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists() or state(pid)[0] == "Z"


@pytest.mark.no_kvm
def test_trace_exec_and_children(tmp_path: Path) -> None:
    """A tracee that execs and forks: an exec line per exec, a line per new process, and the
    command's own exit status."""
    proc = vmm("trace", "--", "sh", "-c", "sleep 0; exec sh -c 'exit 3'")
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert sum(" exec " in ln for ln in lines) == 3  # sh, sleep (in the child), sh again
    assert sum(" new process " in ln for ln in lines) == 1
    assert any(ln.endswith("exited with status 3") for ln in lines)


@pytest.mark.no_kvm
def test_trace_attach_and_detach(tmp_path: Path) -> None:
    """-p, then Ctrl-C: exit 0, and the process is running again and no longer traced."""
    with sleeper() as pid:
        out = tmp_path / "events"
        tracer = subprocess.Popen(
            [sys.executable, "-m", "vmm", "trace", "--summary", "-o", str(out), "-p", str(pid)],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for(out, f"attached to {pid}")
        assert state(pid)[1] == tracer.pid
        tracer.send_signal(signal.SIGINT)
        _, err = tracer.communicate(timeout=30)
        assert tracer.returncode == 0 and "Traceback" not in err, err
        assert state(pid) == ("S", 0)
        assert f"process {pid} sleep 60: detached, still running" in out.read_text()


@pytest.mark.host_only
def test_trace_attach_to_a_running_vmm(kvm: Kvm, tmp_path: Path) -> None:
    """-p of `vmm boot` in the middle of a long guest: its vCPU thread is found (kvm_run from
    /proc/PID/maps), its exits decoded; after Ctrl-C the guest runs to GUEST_DONE as if never traced."""
    boot = subprocess.Popen(
        [sys.executable, "-m", "vmm", "boot", "bench_exits", "--arg", "400000", "--timeout", "300"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(Path(f"/proc/{boot.pid}/maps"), "anon_inode:kvm-vcpu:0", timeout=60)  # its kvm_run is mapped
        out = tmp_path / "events"
        tracer = subprocess.Popen([sys.executable, "-m", "vmm", "trace", "-o", str(out), "-p", str(boot.pid)], cwd=ROOT)
        wait_for(out, f"KVM_EXIT_IO out port={UCALL_PORT:#x}")
        tracer.send_signal(signal.SIGINT)
        assert tracer.wait(timeout=30) == 0
        assert all(state(int(t))[1] == 0 for t in os.listdir(f"/proc/{boot.pid}/task"))
        report, _ = boot.communicate(timeout=300)
    finally:
        boot.kill()
    assert boot.returncode == 0, report
    assert "passed (GUEST_DONE)" in report


@pytest.mark.host_only
def test_trace_filters(kvm: Kvm, tmp_path: Path) -> None:
    """--only exits shows only KVM_RUN lines (and process lines); --vm picks one VM; -o writes the
    lines to a file."""
    out = tmp_path / "events"
    proc = vmm("trace", "--only", "exits", "-o", str(out), "--", sys.executable, str(WORKLOAD), "exits", "3")
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in out.read_text().splitlines() if "KVM" in ln or " vm" in ln]
    assert len(lines) == 4 and all("KVM_RUN = 0: KVM_EXIT_IO" in ln for ln in lines)
    proc = vmm("trace", "--vm", "7", "-o", str(out), "--", sys.executable, str(WORKLOAD), "exits", "3")
    assert proc.returncode == 0 and " vm0" not in out.read_text()
    proc = vmm(
        "trace", "--only", "kvm", "--only", "memory", "-o", str(out), "--", sys.executable, str(WORKLOAD), "exits", "3"
    )
    text = out.read_text()
    assert "KVM_CREATE_VM" in text and "KVM_SET_USER_MEMORY_REGION" in text and "KVM_RUN" not in text
