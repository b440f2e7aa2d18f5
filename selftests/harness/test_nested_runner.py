"""The nested-virt runner (vmm/tools/nested/): kernel lookup, QEMU arguments, init script, and a real boot."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
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
    """--kernel beats $VMM_TEST_KERNEL beats the cached build beats ../shared/kernels."""
    checkout = kernel_env / "checkout"
    shared = touch(kernel_env / "shared" / "kernels" / "bzImage-6.12-swprot")
    assert nested.find_kernel(None, checkout=checkout) == shared
    cached = touch(kernel_env / "cache" / "kernels" / "bzImage")
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
    touch(kernel_env / "cache" / "kernels" / "bzImage")
    missing = str(kernel_env / "nope")
    if source == "VMM_TEST_KERNEL":
        monkeypatch.setenv("VMM_TEST_KERNEL", missing)
    with pytest.raises(VmmError, match=f"{missing}.*does not exist.*build-test-kernel"):
        nested.find_kernel(missing if source == "--kernel" else None, checkout=kernel_env / "checkout")


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
        out = subprocess.run([script, "--print-path"], capture_output=True, text=True, check=True).stdout
        assert Path(out.strip()) == nested.cached_kernel()


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


def test_results_folder_guard(tmp_path: Path) -> None:
    """The results folder is emptied each run, but never when it is the checkout (or contains it)."""
    with pytest.raises(VmmError, match="refusing"):
        nested._prepare_results(tmp_path, tmp_path)
    with pytest.raises(VmmError, match="refusing"):
        nested._prepare_results(tmp_path, tmp_path / "checkout")
    results = tmp_path / "r"
    touch(results / "stale" / "exit-status")
    nested._prepare_results(results, tmp_path / "checkout")
    assert results.is_dir() and not any(results.iterdir())


def test_summary_and_exit_codes(tmp_path: Path) -> None:
    """The one-line summary names the verdict; only passed maps to 0, tests-failed to 1, the rest to 3."""

    def res(verdict: Verdict, status: int | None) -> nested.NestedResult:
        return nested.NestedResult(verdict, status, 312.4, 9.2, None, None, tmp_path, "tcg (auto)", "Kernel panic - x")

    assert nested.summary(res(Verdict.PASSED, 0)) == "nested: PASSED in 312 s (boot 9 s, accel tcg)"
    assert nested.summary(res(Verdict.KERNEL_PANIC, None)).startswith("nested: FAILED: kernel panic")
    assert "exit status 1" in nested.summary(res(Verdict.TESTS_FAILED, 1))
    assert [nested.EXIT_CODES.get(v, 3) for v in Verdict] == [0, 1, 3, 3, 3]


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
