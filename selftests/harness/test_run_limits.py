"""Runs keep their bounds: a timeout bounds the whole run (not each SYNC) and must be a finite
number > 0; the kick signal (SIGRTMIN) never kills the process; when one vCPU fails the others
stop at once and the failure, not the stop, is reported; and thousands of runs leak neither
runners, fds nor memory (guest/hostile_sync_loop.S, guest/hostile_smp.S)."""

from __future__ import annotations

import gc
import math
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from vmm import GuestAssertion, GuestTimeout, Kvm, Machine, Ucall, VmmError, load_guest
from vmm.guest.runner import Runner, _watchdog
from vmm.kvm import vcpu as vcpu_module
from vmm.tools.boot import SYNCS_SHOWN
from vmm.tools.pytest_plugin import boot

# vmm's own behaviour, the same in any kernel: the nested runs leave it to the host
pytestmark = pytest.mark.host_only

ROOT = Path(__file__).resolve().parents[2]  # the checkout
SAFETY_S = 15.0  # a run the code under test fails to bound is stopped from here after this long


def python(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter (a death by signal shows as a negative returncode)."""
    cmd = [sys.executable, "-c", script, *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout, stdin=subprocess.DEVNULL)


@contextmanager
def safety_stop(runners: list[Runner]) -> Iterator[None]:
    """If the runners still run after SAFETY_S, time them out from here (so a run the code under
    test does not bound fails the test instead of hanging it)."""
    done = threading.Event()

    def stop() -> None:
        while not done.wait(0.05):
            if time.monotonic() - start > SAFETY_S:
                for r in runners:
                    r.timed_out = True
                    r.vcpu.kick()

    start = time.monotonic()
    thread = threading.Thread(target=stop, name="safety-stop", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


# --- 3. a timeout bounds the whole run -----------------------------------------------------------


def test_run_until_done_timeout_bounds_the_whole_run(kvm: Kvm) -> None:
    """A guest that SYNCs in an endless loop: run_until_done(timeout=0.5) ends with GuestTimeout
    after about 0.5 s, however many SYNCs came meanwhile (each SYNC used to restart the clock)."""
    syncs: list[Ucall] = []
    with boot("hostile_sync_loop", kvm) as m, safety_stop(m.runners):
        start = time.monotonic()
        with pytest.raises(GuestTimeout) as failure:
            m.runners[0].run_until_done(timeout=0.5, on_sync=syncs.append)
        elapsed = time.monotonic() - start
    assert 0.5 <= elapsed < 2.0, f"the 0.5 s run took {elapsed:.2f} s"
    assert len(syncs) > 100 and "within 0.5 s" in str(failure.value)


def test_run_all_timeout_bounds_the_whole_run(kvm: Kvm) -> None:
    """The same through Machine.run_all (the `vmm boot` path)."""
    with boot("hostile_sync_loop", kvm) as m, safety_stop(m.runners):
        start = time.monotonic()
        with pytest.raises(GuestTimeout):
            m.run_all(timeout=0.5)
        elapsed = time.monotonic() - start
    assert 0.5 <= elapsed < 2.0, f"the 0.5 s run took {elapsed:.2f} s"


def test_boot_timeout_bounds_the_whole_run() -> None:
    """`vmm boot hostile_sync_loop --timeout 1` ends with exit 4 (TIMEOUT) after about a second."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "vmm", "boot", "hostile_sync_loop", "--timeout", "1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 4 and "TIMEOUT" in proc.stdout, proc.stdout[-2000:] + proc.stderr
    assert time.monotonic() - start < 20
    # tens of thousands of SYNCs, but the report shows the first SYNCS_SHOWN and a count
    sync_lines = [ln for ln in proc.stdout.splitlines() if ln.lstrip().startswith("sync ")]
    assert len(sync_lines) == SYNCS_SHOWN + 1 and "more SYNCs not shown" in sync_lines[-1], sync_lines[-3:]


BAD_TIMEOUTS = [math.nan, math.inf, -math.inf, 0, 0.0, -1.0]


@pytest.mark.parametrize("timeout", BAD_TIMEOUTS, ids=str)
def test_library_refuses_a_timeout_that_does_not_bound(kvm: Kvm, timeout: float) -> None:
    """nan, inf, 0 and negative timeouts are a VmmError from run(), run_until_done() and run_all(),
    raised before the guest runs (hello would otherwise pass at once)."""
    with boot("hello", kvm, output=lambda v, t: None) as m:
        for call in (
            lambda: m.run(timeout=timeout),
            lambda: m.runners[0].run_until_done(timeout),
            lambda: m.run_all(timeout),
        ):
            with pytest.raises(VmmError, match="timeout"):
                call()
        assert sum(m.runners[0].exit_counts) == 0


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1", "1e999"])
def test_boot_refuses_a_timeout_that_does_not_bound(value: str) -> None:
    """`vmm boot --timeout` refuses nan, inf, 0 and negatives: one line naming --timeout, exit 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "vmm", "boot", "hello", f"--timeout={value}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "booting" not in proc.stdout and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--timeout" in lines[0], proc.stderr


def test_timeout_help_says_whole_run() -> None:
    """The option's help says what it bounds."""
    proc = subprocess.run([sys.executable, "-m", "vmm", "boot", "-h"], capture_output=True, text=True, cwd=ROOT)
    assert "whole run" in " ".join(proc.stdout.split())


# --- the kick signal ---------------------------------------------------------------------------


def test_kick_signal_is_realtime_and_handled_from_import() -> None:
    """The kick signal is SIGRTMIN (Firecracker's choice), and `import vmm` on the main thread
    installs its handler before any vCPU exists."""
    assert vcpu_module.KICK_SIGNAL == signal.SIGRTMIN
    proc = python(
        "import signal, vmm\n"
        "from vmm.kvm.vcpu import KICK_SIGNAL\n"
        "print(KICK_SIGNAL == signal.SIGRTMIN, callable(signal.getsignal(KICK_SIGNAL)))"
    )
    assert proc.stdout.split() == ["True", "True"], proc.stdout + proc.stderr


WORKER_THREAD_MACHINE = r"""
import threading
import vmm
from vmm import GuestAssertion, Machine, load_guest

def work():
    for i in range(20):
        with Machine(vcpus=4, output=lambda v, t: None) as m:
            m.load(load_guest("hostile_smp"), arg=(1000 << 8) | (i % 4))
            try:
                m.run_all(timeout=10)
            except GuestAssertion as e:
                assert e.vcpu_id == i % 4, e
            else:
                raise AssertionError("no failure")
    print("survived", flush=True)

t = threading.Thread(target=work)
t.start()
t.join()
"""


def test_kicks_from_machines_on_worker_threads_never_kill() -> None:
    """Machines created and run on a worker thread (no vCPU ever made on the main thread): the
    kicks that stop their vCPUs never kill the process (they used to: SIGUSR1's default action,
    exit 138, when the handler was only installed for vCPUs made on the main thread)."""
    proc = python(WORKER_THREAD_MACHINE, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "survived", (proc.returncode, proc.stdout, proc.stderr)


# --- stopping the other vCPUs ------------------------------------------------------------------


def test_failing_vcpu_stops_the_others(kvm: Kvm) -> None:
    """hostile_smp: vCPU 1 fails while vCPU 3 SYNCs in a loop and vCPUs 0 and 2 spin: run_all
    reports vCPU 1's assert (not a stop or a timeout) well before the 30 s timeout."""
    with boot("hostile_smp", kvm, arg=(100_000 << 8) | 1) as m, safety_stop(m.runners):
        start = time.monotonic()
        with pytest.raises(GuestAssertion) as failure:
            m.run_all(timeout=30)
        elapsed = time.monotonic() - start
    assert failure.value.vcpu_id == 1
    assert elapsed < 1.0, f"the others took {elapsed:.2f} s to stop"


STRESS = r"""
import statistics, sys, time
from vmm import GuestAssertion, Kvm, Machine, load_guest

runs = int(sys.argv[1])
image = load_guest("hostile_smp")
failed_at: list[float] = []


def output(vcpu_id, text):
    if text == "failing now":  # printed by the failing vCPU just before its assert
        failed_at.append(time.monotonic())


latency, total = [], []
with Kvm() as kvm:
    for i in range(runs):
        failing, delay = i % 4, (0, 1000, 100_000)[i % 3]
        with Machine(kvm=kvm, vcpus=4, output=output) as m:
            m.load(image, arg=delay << 8 | failing)
            failed_at.clear()
            start = time.monotonic()
            try:
                m.run_all(timeout=20)
            except GuestAssertion as e:
                assert e.vcpu_id == failing, f"run {i}: {e}"
            else:
                raise AssertionError(f"run {i}: no failure reported")
            end = time.monotonic()
            latency.append(end - failed_at[0])
            total.append(end - start)
latency.sort()
print(f"runs {runs} stop_median_ms {statistics.median(latency) * 1e3:.2f} "
      f"stop_p99_ms {latency[int(runs * 0.99) - 1] * 1e3:.2f} stop_max_ms {latency[-1] * 1e3:.2f} "
      f"run_all_median_ms {statistics.median(total) * 1e3:.2f} run_all_max_ms {max(total) * 1e3:.2f}", flush=True)
"""


def test_stress_one_failing_vcpu_of_four(record_property: Callable[[str, object], None]) -> None:
    """200 runs of 4 vCPUs where one fails (each vCPU in turn, at once or after a delay) while the
    others SYNC in a loop or spin: every run reports that vCPU's assert, run_all returns promptly
    after the failure (the failing vCPU's PRINT just before it): a median under 100 ms and every
    run within 2 s, a tenth of the 20 s timeout that would otherwise end it, and the process (a
    subprocess: a death shows) never dies. Measured here: median 0.4 ms, max under 10 ms on a quiet
    host; max 166 ms while nested QEMU runs kept both cores busy."""
    start = time.monotonic()
    proc = python(STRESS, "200", timeout=240)
    wall = time.monotonic() - start
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    fields = proc.stdout.split()
    stats = dict(zip(fields[::2], fields[1::2]))
    assert stats["runs"] == "200", proc.stdout
    record_property("stress", stats)
    record_property("stress_wall_s", round(wall, 1))
    print(f"stress: {proc.stdout.strip()}, wall {wall:.1f} s")
    assert float(stats["stop_median_ms"]) < 100 and float(stats["stop_max_ms"]) < 2000, stats
    assert wall < 200


# --- 4. no leaks in long-lived use -------------------------------------------------------------

LEAK_RUNS = 2000
RSS_BOUND = 1 << 20  # bytes the RSS may grow over 1,500 runs after a 500-run warm-up (measured: 0-200 KiB)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_thousands_of_runs_leak_nothing(kvm: Kvm, record_property: Callable[[str, object], None]) -> None:
    """2,000 Machines, each booting a guest that passes, fails an assert or times out (0.005 s):
    afterwards no Runner is alive (the watchdog holds none), and the open fds and the RSS after a
    500-run warm-up stay where they were."""
    images = [load_guest(n) for n in ("hello", "assert_fail", "exits")]
    runners: list[weakref.ref[Runner]] = []

    def one(i: int) -> None:
        kind = i % 3
        with Machine(kvm=kvm, output=lambda v, t: None) as m:
            m.load(images[kind], arg=6)  # exits: 6 spins (a timeout); the others ignore rcx
            runners.append(weakref.ref(m.runners[0]))
            try:
                m.run_all(timeout=5 if kind < 2 else 0.005)
            except (GuestAssertion, GuestTimeout):
                assert kind > 0

    start = time.monotonic()
    for i in range(500):
        one(i)
    gc.collect()
    fds, rss0 = sorted(os.listdir("/proc/self/fd")), rss()
    for i in range(500, LEAK_RUNS):
        one(i)
    gc.collect()
    growth = rss() - rss0
    elapsed = time.monotonic() - start
    record_property("rss_growth_bytes", growth)
    print(f"{LEAK_RUNS} runs in {elapsed:.1f} s; RSS growth over the last 1,500: {growth / 1024:.0f} KiB")
    assert sum(r() is not None for r in runners) == 0, "finished Runners are still alive"
    assert _watchdog.watched() == 0
    assert sorted(os.listdir("/proc/self/fd")) == fds
    assert growth < RSS_BOUND, f"RSS grew {growth / 1024:.0f} KiB"
