"""The nested-virt runner (vmm/tools/nested/): kernel lookup, QEMU arguments, init script, and a real boot."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmm import VmmError
from vmm.tools import nested
from vmm.tools.nested import Verdict

pytestmark = pytest.mark.no_kvm  # the runner is host-side logic; its e2e tests boot their own kernel

ROOT = Path(__file__).resolve().parents[2]  # the checkout
SMOKE = ["selftests/nested_smoke", "--confcutdir", "selftests/nested_smoke", "-q"]


@pytest.fixture
def kernel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated world: empty cache dir, no $VMM_TEST_KERNEL, a fake checkout under tmp_path."""
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VMM_TEST_KERNEL", raising=False)
    (tmp_path / "checkout").mkdir()
    return tmp_path


def touch(path: Path) -> Path:
    """Create a file (and its parents); return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"bzImage")
    return path


def test_find_kernel_order(kernel_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--kernel beats $VMM_TEST_KERNEL beats the cached 6.12 build beats ../shared/kernels."""
    checkout = kernel_env / "checkout"
    shared = touch(kernel_env / "shared" / "kernels" / "bzImage-6.12-swprot")
    assert nested.find_kernel(None, checkout=checkout) == shared
    cached = touch(kernel_env / "cache" / "kernels" / "bzImage-6.12-swprot")
    assert nested.find_kernel(None, checkout=checkout) == cached
    from_env = touch(kernel_env / "env-bzImage")
    monkeypatch.setenv("VMM_TEST_KERNEL", str(from_env))
    assert nested.find_kernel(None, checkout=checkout) == from_env
    explicit = touch(kernel_env / "explicit-bzImage")
    assert nested.find_kernel(str(explicit), checkout=checkout) == explicit


def test_missing_kernel_says_how_to_build(kernel_env: Path) -> None:
    """With no kernel anywhere, VmmError names scripts/build-test-kernel."""
    with pytest.raises(VmmError, match="scripts/build-test-kernel"):
        nested.find_kernel(None, checkout=kernel_env / "checkout")


@pytest.mark.parametrize("source", ["--kernel", "VMM_TEST_KERNEL"])
def test_named_kernel_must_exist(kernel_env: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    """A kernel named by --kernel or $VMM_TEST_KERNEL that does not exist is an error, not skipped over."""
    touch(kernel_env / "cache" / "kernels" / "bzImage-6.12-swprot")
    missing = str(kernel_env / "nope")
    if source == "VMM_TEST_KERNEL":
        monkeypatch.setenv("VMM_TEST_KERNEL", missing)
    with pytest.raises(VmmError, match=f"{missing}.*does not exist.*build-test-kernel"):
        nested.find_kernel(missing if source == "--kernel" else None, checkout=kernel_env / "checkout")


@pytest.mark.parametrize("version", ["6.12", "7.3"])
def test_find_kernel_by_version(kernel_env: Path, version: str) -> None:
    """--kernel 6.12|7.3 is the cached build of that version, else ../shared/kernels; a missing one
    names the build command for it."""
    checkout = kernel_env / "checkout"
    with pytest.raises(VmmError, match=f"build-test-kernel --version {version}"):
        nested.find_kernel(version, checkout=checkout)
    shared = touch(kernel_env / "shared" / "kernels" / f"bzImage-{version}-swprot")
    assert nested.find_kernel(version, checkout=checkout) == shared
    cached = touch(kernel_env / "cache" / "kernels" / f"bzImage-{version}-swprot")
    assert nested.find_kernel(version, checkout=checkout) == cached
    assert nested.host.kernel_version_of(cached) == version


def test_build_script_installs_where_find_kernel_looks(kernel_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/build-test-kernel --print-path agrees with cached_kernel(), with and without overrides."""
    script = str(ROOT / "scripts" / "build-test-kernel")
    for env in (
        {"VMM_CACHE_DIR": str(kernel_env / "c")},
        {"XDG_CACHE_HOME": str(kernel_env / "x")},
        {"HOME": str(kernel_env / "home")},
    ):
        for var in ("VMM_CACHE_DIR", "XDG_CACHE_HOME"):
            monkeypatch.delenv(var, raising=False)
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        for version in ("6.12", "7.3"):
            out = subprocess.run(
                [script, "--version", version, "--print-path"], capture_output=True, text=True, check=True
            ).stdout
            assert Path(out.strip()) == nested.cached_kernel(version)


def test_fragment_options_are_in_the_prebuilt_config() -> None:
    """Every option of scripts/test-kernel.config except MEMCG is set in the prebuilt kernel's config."""
    config = ROOT.parent / "shared" / "kernels" / "bzImage-6.12-swprot.config"
    if not config.exists():
        pytest.skip(f"needs the prebuilt kernel's config at {config}")
    have = set(config.read_text().splitlines())
    wanted = [
        ln for ln in (ROOT / "scripts" / "test-kernel.config").read_text().splitlines() if ln.startswith("CONFIG_")
    ]
    assert "CONFIG_KVM_SW_PROTECTED_VM=y" in wanted
    assert [w for w in wanted if w not in have] == ["CONFIG_MEMCG=y"]  # added on top of the prebuilt


def test_choose_accel_explicit() -> None:
    """tcg and kvm map to fixed QEMU arguments; anything else is a VmmError."""
    assert nested.choose_accel("tcg")[:2] == (["-accel", "tcg,thread=single"], ["-cpu", "max"])
    assert nested.choose_accel("kvm")[:2] == (["-accel", "kvm"], ["-cpu", "host"])
    with pytest.raises(VmmError, match="unknown accelerator"):
        nested.choose_accel("hvf")


@pytest.mark.parametrize("available", [True, False])
def test_choose_accel_auto(monkeypatch: pytest.MonkeyPatch, available: bool) -> None:
    """auto picks kvm exactly when nested virtualization is available, and says why."""
    monkeypatch.setattr(nested.host, "nested_virt_available", lambda: (available, "because"))
    accel, cpu, desc = nested.choose_accel("auto")
    assert accel[1].split(",")[0] == ("kvm" if available else "tcg")
    assert cpu == ["-cpu", "host" if available else "max"]
    assert "because" in desc


def test_nested_virt_available_matches_cpuinfo() -> None:
    """Without vmx/svm in /proc/cpuinfo (e.g. kvm_pvm hosts) nested virtualization is reported missing."""
    ok, reason = nested.nested_virt_available()
    assert isinstance(ok, bool) and reason
    flags = {
        f
        for ln in Path("/proc/cpuinfo").read_text().splitlines()
        if ln.startswith("flags")
        for f in ln.partition(":")[2].split()
    }
    if not flags & {"vmx", "svm"}:
        assert not ok
        assert "vmx" in reason or "/dev/kvm" in reason


def test_init_script(tmp_path: Path) -> None:
    """The init script is valid sh: exports, mounts, anchor VMs before pytest, exit status, power-off."""
    checkout, results = Path("/work/x"), Path("/work/x/results/nested")
    python = checkout / ".venv" / "bin" / "python"
    env = nested.guest_env(checkout, python, {"EXTRA": "a b"})
    script = nested.init_script(checkout, results, python, ["-k", "it's"], env)
    (tmp_path / "init.sh").write_text(script)
    subprocess.run(["sh", "-n", str(tmp_path / "init.sh")], check=True)
    for needle in (
        "export VMM_NESTED=1",
        "export VMM_REQUIRE_PRIVATE_MEM=1",
        "export PYTHONDONTWRITEBYTECODE=1",
        "export EXTRA='a b'",
        "mount -t proc",
        "mount -t sysfs",
        "mount -t devtmpfs",
        "tmpfs /tmp",
        "tmpfs /run",
        "checkout /work/x ",
        "cd /work/x",
        "/work/x/.venv/bin/python -m pytest -k 'it'\"'\"'s'",
        "> /work/x/results/nested/exit-status",
        "echo o > /proc/sysrq-trigger",
    ):
        assert needle in script, needle
    anchor, wait, pytest_at = (
        script.index(x) for x in ("KVM_CREATE_IRQCHIP", f"[ ! -e {nested.ANCHOR_READY} ]", " -m pytest")
    )
    assert anchor < wait < pytest_at  # the anchor VMs hold KVM's static keys before any test runs
    assert "mount_tag=results" not in script and " results /work" not in script  # inside the checkout
    outside = nested.init_script(checkout, Path("/srv/out"), python, [], env)
    assert "results /srv/out" in outside


def test_init_script_command(tmp_path: Path) -> None:
    """With a shell command instead of pytest, the script runs it in a subshell and records its status."""
    python = Path("/c/.venv/bin/python")
    script = nested.init_script(
        Path("/c"),
        Path("/c/results/nested"),
        python,
        [],
        nested.guest_env(Path("/c"), python),
        command="echo hi; exit 3",
    )
    (tmp_path / "init.sh").write_text(script)
    subprocess.run(["sh", "-n", str(tmp_path / "init.sh")], check=True)
    assert "( echo hi; exit 3\n)" in script and " -m pytest" not in script
    assert "rc=$?" in script and "command exit status $rc" in script


def test_qemu_command(tmp_path: Path) -> None:
    """QEMU gets 4G/2 CPUs, no reboot, the host root read-only and the checkout writable over 9p."""
    cmd = nested.qemu_command(
        Path("/k/bzImage"),
        ["-accel", "tcg"],
        ["-cpu", "max"],
        Path("/c"),
        Path("/c/results/nested"),
        Path("/c/results/nested/init.sh"),
    )
    joined = " ".join(cmd)
    assert cmd[0] == "qemu-system-x86_64"
    for needle in (
        "-m 4G",
        "-smp 2",
        "-nodefaults -nographic -serial stdio",
        "-no-reboot",
        "-kernel /k/bzImage",
        "path=/,mount_tag=hostroot,readonly=on",
        "path=/c,mount_tag=checkout",
    ):
        assert needle in joined, needle
    append = cmd[cmd.index("-append") + 1].split()
    assert {"root=hostroot", "rootfstype=9p", "ro", "init=/c/results/nested/init.sh", "console=ttyS0"} <= set(append)
    assert "mount_tag=results" not in joined
    other = nested.qemu_command(Path("/k"), [], [], Path("/c"), Path("/r"), Path("/r/init.sh"))
    assert "local,security_model=none,multidevs=remap,path=/r,mount_tag=results" in other
    commas = " ".join(nested.qemu_command(Path("/k"), [], [], Path("/c,1"), Path("/r,2"), Path("/r,2/init.sh")))
    assert "path=/c,,1,mount_tag=checkout" in commas  # QEMU reads ",," as a comma inside a value
    assert "path=/r,,2,mount_tag=results" in commas


def test_results_folder_guard(tmp_path: Path) -> None:
    """Never the checkout (or above it); a folder with someone else's files, or a plain file, is refused
    and left exactly as it was; a new or empty folder gets the marker."""
    with pytest.raises(VmmError, match="refusing"):
        nested._prepare_results(tmp_path, tmp_path)
    with pytest.raises(VmmError, match="refusing"):
        nested._prepare_results(tmp_path, tmp_path / "checkout")
    users = tmp_path / "thesis"
    touch(users / "chapter1.tex")
    touch(users / "exit-status")  # one of vmm's names does not make the folder vmm's
    with pytest.raises(VmmError, match="refusing.*files vmm did not write.*chapter1.tex"):
        nested._prepare_results(users, tmp_path / "checkout")
    assert sorted(p.name for p in users.iterdir()) == ["chapter1.tex", "exit-status"]
    with pytest.raises(VmmError, match="not a folder"):
        nested._prepare_results(users / "chapter1.tex", tmp_path / "checkout")
    assert (users / "chapter1.tex").read_bytes() == b"bzImage"
    with pytest.raises(VmmError, match="kernel command line"):
        nested._prepare_results(tmp_path / "my results", tmp_path / "checkout")
    assert not (tmp_path / "my results").exists()
    for new in (tmp_path / "a" / "new", tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        nested._prepare_results(new, tmp_path / "checkout").release()
        assert [p.name for p in new.iterdir()] == [nested.RESULTS_MARKER]


def test_results_folder_of_an_older_vmm_is_adopted(tmp_path: Path) -> None:
    """A folder holding only what vmm wrote before the marker existed (its init.sh says so) is taken over."""
    old = tmp_path / "nested"
    (old / "init.sh").parent.mkdir()
    (old / "init.sh").write_text(nested.init_script(Path("/c"), old, Path("/p"), [], {}))
    (old / "exit-status").write_text("0\n")
    folder = nested._prepare_results(old, tmp_path / "checkout")
    folder.release()
    assert [p.name for p in old.iterdir()] == [nested.RESULTS_MARKER]
    other = tmp_path / "other"
    touch(other / "init.sh")  # the same names, but not vmm's init.sh
    with pytest.raises(VmmError, match="files vmm did not write"):
        nested._prepare_results(other, tmp_path / "checkout")
    assert (other / "init.sh").read_bytes() == b"bzImage"


def test_results_folder_is_held_by_one_run(tmp_path: Path) -> None:
    """While a run holds the folder (flock on the marker) a second run is refused, and deletes nothing."""
    results = tmp_path / "r"
    first = nested._prepare_results(results, tmp_path / "checkout")
    (results / "console.log").write_text("the first run's console\n")
    with pytest.raises(VmmError, match="in use by another"):
        nested._prepare_results(results, tmp_path / "checkout")
    assert (results / "console.log").read_text() == "the first run's console\n"
    first.release()
    nested._prepare_results(results, tmp_path / "checkout").release()
    assert not (results / "console.log").exists()


def test_default_results_folder_is_reused_and_only_vmm_files_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """results/nested serves run after run: each run deletes what earlier runs (and their guests) wrote,
    so a stale exit status cannot pass, and leaves the user's files, even inside a folder a run made."""
    body = f"""
for a in "$@"; do case "$a" in *init=*) init="${{a##*init=}}";; esac; done
results="$(dirname "$init")"
echo '{nested.INIT_MARK}'
if [ "$FAKE_MODE" = write ]; then
    mkdir -p "$results/bench" && echo '{{}}' > "$results/bench/figures.json" && echo 0 > "$results/exit-status"
fi
"""
    monkeypatch.setattr(nested.qemu, "QEMU", fake_qemu(tmp_path, body)[0])
    checkout, kernel = tmp_path / "checkout", touch(tmp_path / "bzImage")
    (checkout / "results").mkdir(parents=True)
    (checkout / "results" / "README").write_text("mine\n")

    def run(mode: str) -> nested.NestedResult:
        monkeypatch.setenv("FAKE_MODE", mode)
        return nested.run_nested(kernel, "tcg", 30, checkout=checkout, echo=lambda _: None, command="true")

    first = run("write")
    results = checkout / "results" / "nested"
    assert first.verdict is Verdict.PASSED and first.console_log.parent == results
    listed = (results / nested.RESULTS_MARKER).read_text().splitlines()
    assert {"bench", "bench/figures.json", "console.log", "exit-status", "init.sh"} <= set(listed)
    touch(results / "notes.txt")
    touch(results / "bench" / "mine.txt")
    second = run("nothing")
    assert second.verdict is Verdict.NO_RESULT  # the first run's exit-status is gone
    assert not (results / "exit-status").exists() and not (results / "bench" / "figures.json").exists()
    assert (results / "notes.txt").is_file() and (results / "bench" / "mine.txt").is_file()
    assert (checkout / "results" / "README").read_text() == "mine\n"
    assert run("write").verdict is Verdict.PASSED  # and again: the folder stays usable
    assert (results / "notes.txt").is_file()


def test_summary_and_exit_codes(tmp_path: Path) -> None:
    """The one-line summary names the verdict; only passed maps to 0, tests-failed to 1, the rest to 3."""

    def res(verdict: Verdict, status: int | None) -> nested.NestedResult:
        return nested.NestedResult(verdict, status, 312.4, 9.2, None, None, tmp_path, "tcg (auto)", "Kernel panic - x")

    assert nested.summary(res(Verdict.PASSED, 0)) == "nested: PASSED in 312 s (boot 9 s, accel tcg)"
    assert nested.summary(res(Verdict.KERNEL_PANIC, None)).startswith("nested: FAILED: kernel panic")
    assert "exit status 1" in nested.summary(res(Verdict.TESTS_FAILED, 1))
    assert [nested.exit_code(res(v, 0)) for v in Verdict if v is not Verdict.INTERRUPTED] == [0, 1, 3, 3, 3]
    stopped = dataclasses.replace(res(Verdict.INTERRUPTED, None), stop_signal=signal.SIGTERM)
    assert nested.exit_code(stopped) == 143
    assert nested.summary(stopped).startswith("nested: STOPPED by SIGTERM, QEMU killed, in 312 s")


def test_nested_missing_kernel(tmp_path: Path) -> None:
    """`vmm nested --kernel MISSING` is a setup error: exit code 2 and one line, without booting."""
    proc = subprocess.run(
        [sys.executable, "-m", "vmm", "nested", "--kernel", str(tmp_path / "missing-bzImage")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "build-test-kernel" in proc.stderr


def fake_qemu(tmp_path: Path, body: str) -> list[str]:
    """A stand-in for QEMU: a shell script with the given body (its console is stdout)."""
    script = tmp_path / "fake-qemu"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return [str(script)]


def test_boot_watch_init_and_exit(tmp_path: Path) -> None:
    """Console lines are streamed and logged; the init mark gives the boot time; QEMU's status is kept."""
    cmd = fake_qemu(
        tmp_path, f"echo 'early'; echo '{nested.INIT_MARK}'; echo '[ 1.0] WARNING: CPU: 0 PID: 1 at x'; exit 7"
    )
    seen: list[str] = []
    with open(tmp_path / "log", "w") as log:
        run = nested.run_qemu(cmd, time.monotonic() + 30, 30, seen.append, log)
    assert seen == ["early", nested.INIT_MARK, "[ 1.0] WARNING: CPU: 0 PID: 1 at x"]
    assert (tmp_path / "log").read_text().splitlines() == seen
    assert run.boot_s is not None and run.qemu_status == 7 and len(run.warnings) == 1
    assert not (run.timed_out or run.hung_in_boot or run.panic_line)


def test_boot_panic_hang_and_timeout(tmp_path: Path) -> None:
    """A panic line is caught; no init within the boot timeout, or no exit by the deadline, kills QEMU."""
    with open(tmp_path / "log", "w") as log:
        panic = nested.run_qemu(
            fake_qemu(tmp_path, f"echo '{nested.INIT_MARK}'; echo 'Kernel panic - not syncing: x'"),
            time.monotonic() + 30,
            30,
            lambda _: None,
            log,
        )
        assert panic.panic_line == "Kernel panic - not syncing: x" and not panic.timed_out
        hang = nested.run_qemu(fake_qemu(tmp_path, "exec sleep 60"), time.monotonic() + 30, 1, lambda _: None, log)
        assert hang.hung_in_boot and hang.qemu_status is None and hang.boot_s is None
        late = nested.run_qemu(
            fake_qemu(tmp_path, f"echo '{nested.INIT_MARK}'; exec sleep 60"),
            time.monotonic() + 1.5,
            30,
            lambda _: None,
            log,
        )
        assert late.timed_out and not late.hung_in_boot and late.qemu_status is None


def test_run_nested_retries_a_hung_boot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_nested with a fake QEMU: the first boot hangs before init, the retry writes exit status 0."""
    # the fake finds the results folder from init=... and plays the init script's part
    body = f"""
for a in "$@"; do case "$a" in *init=*) init="${{a##*init=}}";; esac; done
results="$(dirname "$init")"
if [ ! -e "$results/first-boot" ]; then : > "$results/first-boot"; exec sleep 60; fi
echo '{nested.INIT_MARK}'; echo 0 > "$results/exit-status"; echo '{nested.POWEROFF_MARK}'
"""
    monkeypatch.setattr(nested.qemu, "QEMU", fake_qemu(tmp_path, body)[0])
    kernel = touch(tmp_path / "bzImage")
    res = nested.run_nested(
        kernel, "tcg", 60, ["-k", "nothing"], results=tmp_path / "results", echo=lambda _: None, boot_timeout_s=2
    )
    assert (res.verdict, res.exit_status, res.boot_attempts) == (Verdict.PASSED, 0, 2)
    assert "retrying the boot once" in res.console_log.read_text()
    init = (tmp_path / "results" / "init.sh").read_text()
    assert "-k nothing" in init and "--junitxml" in init


def alive(pid: int) -> bool:
    """Whether pid is a process that still runs (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def still_alive(pids: list[int], within_s: float = 2.0) -> list[int]:
    """The pids that still run after within_s seconds (returns as soon as none does)."""
    end = time.monotonic() + within_s
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < end:
        time.sleep(0.05)
    return left


class FakeQemuRun:
    """`python -m vmm nested` in a subprocess with $VMM_QEMU pointing at a fake that records its pids."""

    def __init__(self, tmp_path: Path, children: bool) -> None:
        self.pids_file = tmp_path / "fake-pids"
        self.expect = 2 if children else 1
        child = f"sleep 600 & echo $! >> {self.pids_file}\n" if children else ""
        # like QEMU: one process that runs until killed (plus, optionally, a child in its process group)
        body = f"{child}echo $$ >> {self.pids_file}\necho '{nested.INIT_MARK}'\nexec sleep 600\n"
        self.results = tmp_path / "results"
        self.out = (tmp_path / "vmm.out").open("w+")
        env = dict(os.environ, VMM_QEMU=fake_qemu(tmp_path, body)[0], PYTHONDONTWRITEBYTECODE="1")
        self.vmm = subprocess.Popen(
            [sys.executable, "-m", "vmm", "nested", "--kernel", str(touch(tmp_path / "bzImage"))]
            + ["--accel", "tcg", "--results", str(self.results), "--command", "true"],
            cwd=ROOT,
            env=env,
            stdout=self.out,
            stderr=subprocess.STDOUT,
            # as from a terminal: whatever this pytest ignores, vmm must not inherit
            preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGHUP)],
        )
        self.pids: list[int] = []

    def started(self) -> list[int]:
        """Wait until the fake QEMU runs and vmm has read its init line; its pids (and its child's)."""
        end = time.monotonic() + 30
        console = self.results / "console.log"
        while time.monotonic() < end and self.vmm.poll() is None:
            if self.pids_file.exists() and console.exists() and nested.INIT_MARK in console.read_text():
                self.pids = [int(x) for x in self.pids_file.read_text().split()]
                assert len(self.pids) == self.expect
                return self.pids
            time.sleep(0.05)
        raise AssertionError(f"the fake QEMU never started: {self.output()}")

    def output(self) -> str:
        """What vmm printed so far."""
        self.out.seek(0)
        return self.out.read()

    def cleanup(self) -> None:
        """Kill what a failed test left behind: only our own fake's processes (checked by name) and vmm."""
        if self.vmm.poll() is None:
            self.vmm.kill()
            self.vmm.wait()
        kill_fakes(self.pids_file)
        self.out.close()


def kill_fakes(pids_file: Path) -> None:
    """SIGKILL the fake QEMU processes listed in pids_file that still run (checked by name: never a stranger)."""
    if not pids_file.exists():
        return
    for pid in (int(x) for x in pids_file.read_text().split()):
        with contextlib.suppress(OSError):
            if alive(pid) and b"sleep" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def fake_run(tmp_path: Path) -> Iterator[Callable[[bool], FakeQemuRun]]:
    """Start `vmm nested` on a fake QEMU; whatever is left is killed at teardown."""
    runs: list[FakeQemuRun] = []

    def start(children: bool = True) -> FakeQemuRun:
        runs.append(FakeQemuRun(tmp_path, children))
        return runs[-1]

    yield start
    for run in runs:
        run.cleanup()


@pytest.mark.parametrize(
    "signals, code",
    [
        ([signal.SIGTERM], 143),  # timeout(1), systemd, CI cancellation
        ([signal.SIGHUP], 129),  # the terminal went away
        ([signal.SIGINT], 130),  # Ctrl-C: at once, not after a 10 s grace
        ([signal.SIGINT, signal.SIGINT], 130),  # Ctrl-C twice
    ],
    ids=["SIGTERM", "SIGHUP", "SIGINT", "SIGINT-twice"],
)
def test_stop_signal_kills_qemu_and_exits_128_plus_signal(
    fake_run: Callable[[bool], FakeQemuRun], signals: list[int], code: int
) -> None:
    """A stop signal ends vmm within a second or two with 128+signal, QEMU and its children gone,
    the console log kept."""
    run = fake_run(True)
    pids = run.started()
    sent = time.monotonic()
    for sig in signals:
        os.kill(run.vmm.pid, sig)
        time.sleep(0.05)
    # a second Ctrl-C may land after vmm's own handling: death by SIGINT, which a shell reports as 130 too
    assert run.vmm.wait(timeout=10) in ((code, -signals[0]) if len(signals) > 1 else (code,)), run.output()
    assert time.monotonic() - sent < 3, run.output()
    assert still_alive(pids) == [], run.output()
    console = (run.results / "console.log").read_text()
    assert nested.INIT_MARK in console
    if len(signals) == 1:
        name = signal.Signals(signals[0]).name
        assert f"vmm-nested: stopped by {name}: QEMU killed" in console
        assert f"nested: STOPPED by {name}, QEMU killed" in run.output() and "Traceback" not in run.output()
        assert nested.RESULTS_MARKER in os.listdir(run.results)


def test_sigkill_of_vmm_kills_qemu(fake_run: Callable[[bool], FakeQemuRun]) -> None:
    """Even a SIGKILLed vmm takes its QEMU along (PR_SET_PDEATHSIG): no QEMU left running at full CPU."""
    run = fake_run(False)
    pids = run.started()
    os.kill(run.vmm.pid, signal.SIGKILL)
    assert run.vmm.wait(timeout=10) == -signal.SIGKILL
    assert still_alive(pids) == []


def test_refused_results_folder_keeps_the_users_files(fake_run: Callable[[bool], FakeQemuRun], tmp_path: Path) -> None:
    """`vmm nested --results DIR` on a folder with a user's file: exit 2, one line, nothing deleted, no boot."""
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "thesis.tex").write_text("four years of work\n")
    run = fake_run(True)
    assert run.vmm.wait(timeout=60) == 2, run.output()
    assert run.output().count("\n") == 1 and "refusing" in run.output()
    assert os.listdir(tmp_path / "results") == ["thesis.tex"]
    assert (tmp_path / "results" / "thesis.tex").read_text() == "four years of work\n"
    assert not run.pids_file.exists()  # QEMU never started


def test_exception_in_the_watch_loop_kills_qemu_at_once(tmp_path: Path) -> None:
    """When the run loop dies (echo raising, like a KeyboardInterrupt would), QEMU is killed at once,
    not given 10 s to exit by itself; its children go too."""
    pids = tmp_path / "pids"
    cmd = fake_qemu(tmp_path, f"sleep 600 & echo $! >> {pids}; echo $$ >> {pids}; echo hello; exec sleep 600")

    def echo(line: str) -> None:
        raise RuntimeError("echo failed")

    start = time.monotonic()
    try:
        with open(tmp_path / "log", "w") as log, pytest.raises(RuntimeError, match="echo failed"):
            nested.run_qemu(cmd, time.monotonic() + 30, 30, echo, log)
        assert time.monotonic() - start < 3
        assert still_alive([int(x) for x in pids.read_text().split()]) == []
    finally:
        kill_fakes(pids)


def test_stop_on_signals_leaves_ignored_signals_ignored() -> None:
    """Under nohup (SIGHUP ignored) vmm keeps ignoring SIGHUP; the others stop the run; all come back after."""
    before = {s: signal.getsignal(s) for s in nested.STOP_SIGNALS}
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with nested.stop_on_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)  # ignored: nothing happens
            with pytest.raises(nested.Interrupted) as stop:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)  # the handler runs at the next bytecode; never gets here
            assert stop.value.signum == signal.SIGTERM
            # the first signal put the old handlers back: a second SIGTERM would act as without vmm
            assert signal.getsignal(signal.SIGTERM) == before[signal.SIGTERM]
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) == before[signal.SIGINT]
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def e2e_kernel() -> Path:
    """The kernel for the end-to-end tests, or a skip saying why there is none."""
    if os.environ.get("VMM_NESTED") == "1":
        pytest.skip("already inside the nested kernel")
    if shutil.which(nested.qemu.QEMU) is None:
        pytest.skip(f"needs {nested.qemu.QEMU} (apt-get install qemu-system-x86)")
    try:
        return nested.find_kernel(None)
    except VmmError as e:
        pytest.skip(f"needs a test kernel: {e}")


@pytest.mark.slow
def test_e2e_smoke_passes(tmp_path: Path) -> None:
    """A real boot: the smoke tests pass inside, console streams, KTAP, JUnit and exit status come back."""
    kernel = e2e_kernel()
    lines: list[str] = []
    res = nested.run_nested(kernel, "auto", 600, SMOKE, results=tmp_path / "results", echo=lines.append)
    assert res.verdict is Verdict.PASSED, "\n".join(lines[-40:])
    assert res.exit_status == 0
    assert res.boot_s is not None and res.boot_s < res.wall_s
    assert nested.INIT_MARK in lines and any("/dev/kvm: /dev/kvm" in ln for ln in lines)
    assert res.junit is not None
    suite = ET.parse(res.junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert (suite.get("failures"), suite.get("errors"), suite.get("skipped")) == ("0", "0", "1")
    assert res.ktap is not None
    ktap = res.ktap.read_text().splitlines()
    for name in ("test_guest_environment", "test_sw_protected_vm", "test_anchor_vm_is_held"):
        assert any(re.fullmatch(rf"ok \d+ selftests/nested_smoke/test_smoke.py::{name}", ln) for ln in ktap), name


@pytest.mark.slow
def test_e2e_failing_test_fails_the_run(tmp_path: Path) -> None:
    """A real boot with one failing test inside: verdict tests-failed and pytest's exit status 1."""
    kernel = e2e_kernel()
    lines: list[str] = []
    res = nested.run_nested(
        kernel, "auto", 600, SMOKE, results=tmp_path / "results", echo=lines.append, extra_env={"VMM_SMOKE_FAIL": "1"}
    )
    assert res.verdict is Verdict.TESTS_FAILED, "\n".join(lines[-40:])
    assert res.exit_status == 1
    assert res.ktap is not None
    assert re.search(r"^not ok \d+ \S+::test_deliberate_failure$", res.ktap.read_text(), re.MULTILINE)
