"""The `vmm` command as a user runs it (a real subprocess): doctor, boot and its verdict exit
codes, and one-line errors without tracebacks for user mistakes."""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_guest_images import Unprivileged, dev_kvm_words, unprivileged_user

from vmm import Cap, GmemFlag, Kvm
from vmm.tools.pytest_plugin import require, require_gmem_flags, require_private_mem

from helpers import one_line_error
from helpers import run_vmm as vmm

ROOT = Path(__file__).resolve().parents[2]  # the checkout


def test_doctor_json(kvm: Kvm) -> None:
    """doctor --json reports the API version, per-fd capabilities and the selftest groups."""
    proc = vmm("doctor", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["kvm_api_version"] == kvm.api_version() == 12
    caps = report["capabilities"]["KVM_CAP_GUEST_MEMFD"]
    assert "/dev/kvm" in caps and "VM(DEFAULT)" in caps
    groups = {g["group"]: g for g in report["selftest_groups"]}
    private = groups["private memory"]
    assert private["runs"] == report["private_memory"]["available"]
    assert private["runs"] or "KVM_X86_SW_PROTECTED_VM" in private["needs"]


def test_doctor_reports_the_device_as_it_is(kvm: Kvm) -> None:
    """doctor names /dev/kvm's real owner, group and mode and who else may use it: "join group X"
    only when the mode gives group X read/write, "run as root" when it gives the group nothing."""
    st = os.stat(kvm.path)
    mode = stat.S_IMODE(st.st_mode)
    device = json.loads(vmm("doctor", "--json").stdout)["device"]
    owner, group = pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name
    assert (device["path"], device["owner"], device["group"], device["mode"]) == (kvm.path, owner, group, f"{mode:04o}")
    if mode & 0o006 == 0o006:
        assert device["users"] == "every user" and not device["advice"]
    elif mode & 0o060 == 0o060:
        assert device["advice"] == f"other users: join group {group}"
    else:
        assert "join group" not in device["advice"] and device["advice"].endswith("run as root")
    text = vmm("doctor").stdout
    assert f"device            {kvm.path} {owner}:{group} {mode:04o}: usable by {device['users']}" in text


def test_doctor_text(kvm: Kvm) -> None:
    """doctor's text report names the capabilities and says where private memory runs."""
    proc = vmm("doctor")
    assert proc.returncode == 0, proc.stderr
    assert "KVM_CAP_GUEST_MEMFD" in proc.stdout and "selftest groups" in proc.stdout
    assert "private memory" in proc.stdout and "nested" in proc.stdout


def test_boot_default_guest(kvm: Kvm) -> None:
    """`vmm boot` boots hello, streams its output, prints a summary and exits 0."""
    proc = vmm("boot")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "guest: hello from a long-mode guest" in out and "passed (GUEST_DONE)" in out
    assert "exits: IO" in out and "memory" in out
    if kvm.check_extension(Cap.BINARY_STATS_FD) > 0:  # the VM's binary stats: how KVM mapped the guest
        assert re.search(r"kvm stats pages_4k \d+, pages_2m \d+", out), out


@pytest.mark.parametrize("backing", ["shared", "guest_memfd", "guest_memfd-only"])
def test_boot_backings(backing: str, kvm: Kvm) -> None:
    """Each backing boots hello on a default VM (guest_memfd needs KVM_CAP_GUEST_MEMFD there, as on
    6.18; guest_memfd-only needs GUEST_MEMFD_FLAG_MMAP|INIT_SHARED)."""
    with kvm.create_vm() as vm:
        if backing != "shared":
            require(vm.check_extension(Cap.GUEST_MEMFD) > 0, "KVM_CAP_GUEST_MEMFD on a default VM")
        if backing == "guest_memfd-only":
            require_gmem_flags(vm, GmemFlag.MMAP | GmemFlag.INIT_SHARED)
    proc = vmm("boot", "hello", "--backing", backing, "--mem", "8M")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"8.0 MiB {backing}" in proc.stdout


def test_boot_real_mode_from_source_path(kvm: Kvm) -> None:
    """A .S path is assembled and booted in the mode its header asks for."""
    proc = vmm("boot", str(ROOT / "guest" / "real_mode.S"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "real mode" in proc.stdout and "hello from real mode" in proc.stdout


def test_boot_verdicts(kvm: Kvm) -> None:
    """A failed guest assert exits 1 showing file:line and values; a spinning guest times out with 4;
    a triple fault stops with 3."""
    failed = vmm("boot", "assert_fail")
    assert failed.returncode == 1 and "assert_fail.S:6" in failed.stdout and "0x29 != 0x2a" in failed.stdout
    timeout = vmm("boot", "exits", "--arg", "6", "--timeout", "0.5")
    assert timeout.returncode == 4 and "TIMEOUT" in timeout.stdout
    shutdown = vmm("boot", "exits", "--arg", "2")
    assert shutdown.returncode == 3 and "KVM_EXIT_SHUTDOWN" in shutdown.stdout


@pytest.mark.no_kvm  # fails before /dev/kvm is opened: the nested run leaves it to the host
def test_user_errors_are_one_line(tmp_path: Path) -> None:
    """Missing/unreadable/malformed guests and bad sizes: one line on stderr, exit 2."""
    assert "not found" in one_line_error(vmm("boot", str(tmp_path / "missing.S")))
    assert "no bundled guest" in one_line_error(vmm("boot", "no_such_guest"))
    bad = tmp_path / "bad.S"
    bad.write_text("this is not assembly\n")
    assert "bad.S:1" in one_line_error(vmm("boot", str(bad), env={"VMM_CACHE_DIR": str(tmp_path / "cache")}))
    unreadable = tmp_path / "secret.bin"
    unreadable.write_bytes(b"\xf4")
    unreadable.chmod(0)
    if os.geteuid() != 0:  # root reads anything
        assert "not readable" in one_line_error(vmm("boot", str(unreadable)))
    elf = tmp_path / "guest.elf"
    elf.write_bytes(b"\x7fELF" + bytes(60))
    assert "ELF" in one_line_error(vmm("boot", str(elf)))
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert "empty" in one_line_error(vmm("boot", str(empty)))
    assert "page size" in one_line_error(vmm("boot", "--mem", "5000"))
    assert "larger than this host" in one_line_error(vmm("boot", "--mem", "100T"))
    assert "bad size" in one_line_error(vmm("boot", "--mem", "lots"))


@pytest.mark.no_kvm  # fails before /dev/kvm is opened: the nested run leaves it to the host
def test_missing_or_forbidden_dev_kvm(tmp_path: Path) -> None:
    """No /dev/kvm, or no permission on it: one line naming the device, exit 2."""
    missing = one_line_error(vmm("boot", env={"VMM_KVM_DEVICE": str(tmp_path / "kvm")}))
    assert "does not exist" in missing
    forbidden = tmp_path / "kvm-forbidden"
    forbidden.write_text("")
    forbidden.chmod(0)
    env = {"VMM_KVM_DEVICE": str(forbidden)}
    if os.geteuid() == 0:  # root ignores file modes unless it gives up CAP_DAC_OVERRIDE
        proc = subprocess.run(
            ["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-m", "vmm", "doctor"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
            env={**os.environ, **env},
        )
    else:
        proc = vmm("doctor", env=env)
    owner = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(forbidden.stat().st_gid).gr_name
    advice = f"{owner}:{group} 0000: its mode gives no one read/write access"
    assert one_line_error(proc) == f"vmm: no read/write access to {forbidden} ({advice})"


USAGE_ERRORS = [
    ("boot", "--vcpus", "0"),
    ("boot", "--vcpus", "-1"),
    ("boot", "--vcpus", "100000"),
    ("boot", "--vcpus", "abc"),
    ("boot", "--backing", "nope"),
    ("boot", "--mode", "protected"),
    ("boot", "--page-size", "1g"),
    ("boot", "--vm-type", "sev"),
    ("boot", "--bogus"),
    ("boot", "hello", "extra"),
    ("boot", "--mem"),
    ("doctor", "--json=3"),
    ("doctor", "--bogus"),
    ("doctor", "extra"),
    ("bench", "exits", "--exits", "0"),
    ("bench", "exits", "--repeats", "x"),
    ("bench", "memslots", "--touch-stride", "3"),
    ("bench", "memslots", "--way", "nope"),
    ("bench", "memslots", "--rounds", "0"),
    ("bench", "memslots", "--vcpus", "0"),
]


@pytest.mark.no_kvm  # parsing only: the nested run leaves it to the host
@pytest.mark.parametrize("args", USAGE_ERRORS, ids=" ".join)
def test_usage_errors_are_one_line(args: tuple[str, ...]) -> None:
    """A bad option value, an unknown option, a missing value or an extra argument: one line
    "vmm: <command>: <message> (try `vmm <command> -h`)", exit 2, no usage block, no traceback."""
    command = " ".join(a for a in args[:2] if a in ("boot", "doctor", "bench", "exits", "memslots"))
    line = one_line_error(vmm(*args))
    assert re.fullmatch(rf"vmm: {command}: .+ \(try `vmm {command} -h`\)", line), line
    assert "Usage:" not in line


@pytest.mark.no_kvm  # parsing only: the nested run leaves it to the host
def test_usage_errors_without_a_command_are_one_line() -> None:
    """An unknown command, and a bad --timeout (whatever its parser), are one line with exit 2 too."""
    assert one_line_error(vmm("no-such-command")) == "vmm: No such command 'no-such-command'. (try `vmm -h`)"
    assert "--timeout" in one_line_error(vmm("boot", "--timeout", "abc"))


@pytest.mark.no_kvm  # parsing only: the nested run leaves it to the host
@pytest.mark.parametrize("args", [("-h",), ("boot", "-h"), ("doctor", "--help"), ("selftest", "-h")], ids=" ".join)
def test_help_is_unchanged(args: tuple[str, ...]) -> None:
    """-h/--help still prints click's full help on stdout and exits 0."""
    proc = vmm(*args)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    assert proc.stdout.startswith("Usage: ") and "Options:" in proc.stdout and "-h, --help" in proc.stdout


# --- a user without access to /dev/kvm ------------------------------------------------------------


@pytest.fixture
def nobody() -> Iterator[Unprivileged]:
    """User nobody with a home of its own (test_guest_images.unprivileged_user)."""
    yield from unprivileged_user()


@pytest.mark.host_only
def test_selftest_without_dev_kvm_skips_what_needs_it(tmp_path: Path) -> None:
    """No KVM device at all: the tests that need it skip naming the device, the rest pass, exit 0
    (before: an error per test and exit 1); naming test files runs just those files."""
    missing = tmp_path / "no-kvm"
    files = ["selftests/harness/test_ucall.py", "selftests/harness/test_ktap.py"]
    proc = vmm("selftest", *files, "-q", "-rs", "-p", "no:cacheprovider", env={"VMM_KVM_DEVICE": str(missing)})
    summary = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 0 and re.fullmatch(r"5 passed, \d+ skipped in .*", summary), proc.stdout[-3000:]
    skips = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skips and all(
        line.endswith(f"needs {missing} ({missing} does not exist: load kvm_intel/kvm_amd or use a host with KVM)")
        for line in skips
    ), skips
    assert proc.stderr.startswith(f"vmm: {missing} does not exist")


@pytest.mark.host_only
def test_unprivileged_doctor_names_the_real_access(nobody: Unprivileged) -> None:
    """As user nobody (no groups): `vmm doctor` on a device it may not open says, in one line, the
    device's owner, group and mode and what gives access: join the group when the mode gives the
    group read/write, run as the owner when it gives the group nothing. Before, it always said
    "run as root or join the 'kvm' group", whatever the device."""
    other = next(g for g in grp.getgrall() if g.gr_gid not in (0, nobody.gid) and "nobody" not in g.gr_mem)
    cases = {
        "0660": (other.gr_gid, f"root:{other.gr_name} 0660: join group {other.gr_name}"),
        "0600": (0, "root:root 0600: run as root"),
        "0640": (other.gr_gid, f"root:{other.gr_name} 0640: run as root"),
    }
    for mode, (gid, advice) in cases.items():
        device = nobody.home / f"kvm-{mode}"
        device.write_text("")
        os.chown(device, 0, gid)
        device.chmod(int(mode, 8))
        line = one_line_error(nobody.vmm("doctor", env={"VMM_KVM_DEVICE": str(device)}))
        assert line == f"vmm: no read/write access to {device} ({advice})"
    real = nobody.vmm("doctor")
    if real.returncode:  # this host's /dev/kvm is closed to nobody: the advice follows its real mode
        owner_group_mode, step = dev_kvm_words()
        assert one_line_error(real) == f"vmm: no read/write access to /dev/kvm ({owner_group_mode}: {step})"


@pytest.mark.host_only
def test_unprivileged_selftest_skips_what_needs_dev_kvm(nobody: Unprivileged) -> None:
    """`vmm selftest` as user nobody: tests that need /dev/kvm skip with one reason naming the
    missing access, tests that do not still pass, nothing errors, exit 0; with
    VMM_REQUIRE_PRIVATE_MEM=1 (the nested kernel) the missing device fails instead. Before: an
    error per test (132 on the whole suite) and exit 1."""
    files = ["selftests/harness/test_ucall.py", "selftests/harness/test_ktap.py"]
    proc = nobody.vmm("selftest", *files, "-q", "-rs")
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out and " error" not in out.splitlines()[-1], out[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    if "skipped" not in summary:  # a host whose /dev/kvm lets everyone in: all of it runs
        assert proc.returncode == 0 and "failed" not in summary, out[-3000:]
        return
    owner_group_mode, step = dev_kvm_words()
    reason = f"needs read/write access to /dev/kvm ({owner_group_mode}: {step})"
    assert proc.returncode == 0, out[-3000:]
    assert re.search(r"\b5 passed\b", summary) and "failed" not in summary, summary  # test_ktap.py
    skips = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skips and all(line.endswith(reason) for line in skips), skips
    assert f"vmm: no read/write access to /dev/kvm ({owner_group_mode}: {step})" in proc.stderr
    assert "PytestCacheWarning" not in out and "could not create cache path" not in out
    strict = nobody.vmm("selftest", files[0], "-q", env={"VMM_REQUIRE_PRIVATE_MEM": "1"})
    assert strict.returncode == 1 and f"VMM_REQUIRE_PRIVATE_MEM=1 but the test kernel's {reason}" in strict.stdout


@pytest.mark.private_mem
def test_private_guest_needs_private_memory(kvm: Kvm) -> None:
    """On a host without private memory, booting the private demo says so in one line; with it,
    the demo runs and prints per-step accounting of shared and private bytes."""
    from vmm.tools.doctor import private_memory

    if not private_memory(kvm):
        message = one_line_error(vmm("boot", "private_demo"))
        assert "KVM_X86_SW_PROTECTED_VM" in message and "vmm nested" in message
        require_private_mem(kvm)  # skips (or fails inside the nested runner)
    proc = vmm("boot", "private_demo", "--timeout", "120")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = [line for line in proc.stdout.splitlines() if line.strip().startswith("step ")]
    assert len(steps) == 6 and "private" in steps[1] and "HYPERCALL" in steps[1]
    assert "conversions" in proc.stdout
