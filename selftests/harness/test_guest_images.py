"""Guest images: where sources build, when they rebuild, and what a bad ``vmm-guest:`` header says.

A user's guest source builds into the per-user cache under a key of its content, never into the
bundled guests' guest/build: a user's hello.S boots itself, not the bundled hello, and two user
files of one name do not collide. An unprivileged user with a read-only checkout builds there too.
Header fields are checked: a bad one is one line naming the file and the field."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from vmm import Kvm, load_guest
from vmm.errors import VmmError
from vmm.guest import image

from helpers import one_line_error
from helpers import run_vmm as vmm

# vmm's own behaviour, the same in any kernel: the nested runs leave it to the host
pytestmark = pytest.mark.host_only

ROOT = Path(__file__).resolve().parents[2]  # the checkout
HELLO = (ROOT / "guest" / "hello.S").read_text()
HELLO_TEXT = "hello from a long-mode guest"  # what the bundled hello prints first


def user_hello(directory: Path, text: str) -> Path:
    """A user's guest named hello.S (the bundled guest's name) that prints ``text`` first."""
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / "hello.S"
    source.write_text(HELLO.replace(HELLO_TEXT, text))
    return source


def fresh_bundled_hello() -> tuple[bytes, int]:
    """The bundled hello.bin after a load (which rebuilds it if stale): its bytes and mtime."""
    load_guest("hello")
    binary = ROOT / "guest" / "build" / "hello.bin"
    return binary.read_bytes(), binary.stat().st_mtime_ns


def dev_kvm_words(path: str = "/dev/kvm") -> tuple[str, str]:
    """What the advice for a user without access to ``path`` must say: "owner:group mode" and the
    step that gives access (join the device's group when its mode gives the group read/write)."""
    st = os.stat(path)
    owner, group = pwd.getpwuid(st.st_uid).pw_name, _group_name(st.st_gid)
    mode = stat.S_IMODE(st.st_mode)
    step = f"join group {group}" if (mode >> 3) & 6 == 6 else f"run as {owner}"
    return f"{owner}:{group} {mode:04o}", step


def _group_name(gid: int) -> str:
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


# --- user guests build by content into the per-user cache -------------------------------------


def test_user_guest_named_like_a_bundled_one_boots_itself(kvm: Kvm, tmp_path: Path) -> None:
    """Two user files named hello.S (one older than the bundled binary, as a copied file can be)
    each boot their own program; the bundled hello.bin is neither booted nor replaced. Before: both
    built into guest/build/hello.bin by file times, so one booted the other's (or the bundled) code."""
    bundled_before = fresh_bundled_hello()
    a = user_hello(tmp_path / "a", "hello from user guest A")
    b = user_hello(tmp_path / "b", "hello from user guest B")
    os.utime(a, (0, 0))  # older than any binary: a build keyed by file times would not rebuild it
    env = {"VMM_CACHE_DIR": str(tmp_path / "cache")}
    for source, text in ((a, "A"), (b, "B"), (a, "A")):
        proc = vmm("boot", str(source), env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"guest: hello from user guest {text}" in proc.stdout and HELLO_TEXT not in proc.stdout
    bundled = vmm("boot", "hello", env=env)
    assert bundled.returncode == 0 and f"guest: {HELLO_TEXT}" in bundled.stdout, bundled.stdout + bundled.stderr
    assert fresh_bundled_hello() == bundled_before  # same bytes, never rewritten
    keys = {image.content_key(a)[:16], image.content_key(b)[:16]}
    assert len(keys) == 2
    built = sorted(p.relative_to(tmp_path / "cache") for p in (tmp_path / "cache").rglob("*.bin"))
    assert built == sorted(Path("guests", k, "hello.bin") for k in keys)


def test_local_include_is_part_of_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user guest's binary follows the files it includes from its own directory: changing one
    gives a new binary (before, only the source's and guest/include's times were compared)."""
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "data_guest.S"
    source.write_text(
        '/* vmm-guest: mode=long description="includes data.h" */\n#include <vmm.h>\n'
        'GUEST_ENTRY\n    GUEST_DONE()\n#include "data.h"\n'
    )
    (tmp_path / "data.h").write_text(".quad 0x1111111111111111\n")
    first = load_guest(str(source))
    (tmp_path / "data.h").write_text(".quad 0x2222222222222222\n")
    os.utime(tmp_path / "data.h", (0, 0))  # an old time: only the content says it changed
    second = load_guest(str(source))
    assert bytes.fromhex("11" * 8) in first.binary and bytes.fromhex("22" * 8) in second.binary
    assert not (ROOT / "guest" / "build" / "data_guest.bin").exists()


def test_unwritable_cache_is_one_line(tmp_path: Path) -> None:
    """A user guest when the cache cannot be created: one line naming the directory and
    VMM_CACHE_DIR, exit 2, and still nothing written to guest/build."""
    bundled_before = fresh_bundled_hello()
    (tmp_path / "a-file").write_text("")
    source = user_hello(tmp_path / "src", "hello from nowhere")
    message = one_line_error(vmm("boot", str(source), env={"VMM_CACHE_DIR": str(tmp_path / "a-file" / "cache")}))
    assert f"cannot write to {tmp_path / 'a-file' / 'cache'}" in message and "VMM_CACHE_DIR" in message
    assert fresh_bundled_hello() == bundled_before


def test_same_source_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second load of an unchanged user guest reuses the cached binary (same file, not rebuilt)."""
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path / "cache"))
    source = user_hello(tmp_path, "hello once")
    load_guest(str(source))
    [binary] = (tmp_path / "cache").rglob("hello.bin")
    os.utime(binary, (1, 1))
    again = load_guest(str(source))
    assert binary.stat().st_mtime == 1 and again.binary == binary.read_bytes()


def test_bundled_guest_rebuilds_when_older_than_its_source(tmp_path: Path) -> None:
    """Bundled guests keep the Makefile's rule in their build directory: a binary older than its
    source (or an include, or guest.ld) is rebuilt, a newer one is used as it is."""
    build = tmp_path / "build"
    built = load_guest("hello", build_dir=build)
    binary = build / "hello.bin"
    assert binary.read_bytes() == built.binary
    os.utime(binary, (1, 1))
    assert load_guest("hello", build_dir=build).binary == built.binary
    assert binary.stat().st_mtime > 1  # rebuilt
    mtime = binary.stat().st_mtime_ns
    load_guest("hello", build_dir=build)
    assert binary.stat().st_mtime_ns == mtime  # fresh: left alone


# --- the vmm-guest header -------------------------------------------------------------------------

BAD_HEADERS = [
    ("vcpus=0", "vcpus"),
    ("vcpus=-1", "vcpus"),
    ("vcpus=257", "vcpus"),
    ("vcpus=" + "9" * 5000, "vcpus"),  # int() refuses strings over 4300 digits with its own error
    ("vcpus=abc", "vcpus"),
    ("vcpus=+1", "vcpus"),
    ("vcpus=", "vcpus"),
    ("mode=protected", "mode"),
    ("vm=sev", "vm"),
    ('description="no closing quote', "description"),
    ("vcpu=2", "vcpu"),  # a misspelt field was ignored: the guest booted with 1 vCPU
    ("mode=long mode=real", "mode"),
]


def write_guest(path: Path, header: str) -> Path:
    path.write_text(f"/* vmm-guest: {header} */\n#include <vmm.h>\nGUEST_ENTRY\n    GUEST_DONE()\n")
    return path


@pytest.mark.parametrize(("header", "field"), BAD_HEADERS, ids=[h[:30] for h, _ in BAD_HEADERS])
def test_bad_header_field_names_file_and_field(tmp_path: Path, header: str, field: str) -> None:
    """read_header refuses each bad field with one line naming the file, its line and the field."""
    source = write_guest(tmp_path / "guest.S", header)
    with pytest.raises(VmmError) as e:
        image.read_header(source)
    message = str(e.value)
    assert len(message.splitlines()) == 1 and len(message) < 300
    assert f"{source}:1:" in message and field in message


@pytest.mark.parametrize(
    ("header", "field"),
    [BAD_HEADERS[i] for i in (0, 1, 3, 4, 8, 9, 10)],
    ids=["vcpus=0", "vcpus=-1", "vcpus=huge", "vcpus=abc", "vm=sev", "unterminated", "unknown"],
)
def test_boot_bad_header_is_one_line(tmp_path: Path, header: str, field: str) -> None:
    """`vmm boot` of a source with a bad header: one line on stderr naming file and field, exit 2,
    before anything is built or /dev/kvm is opened."""
    source = write_guest(tmp_path / "guest.S", header)
    message = one_line_error(vmm("boot", str(source), env={"VMM_CACHE_DIR": str(tmp_path / "cache")}))
    assert str(source) in message and field in message
    assert not (tmp_path / "cache").exists()


def test_bundled_headers_are_valid() -> None:
    """Every bundled guest's header passes the checks (and its values are what load() uses)."""
    for name, source in image.bundled().items():
        header = image.read_header(source)
        assert header, f"{name} has no vmm-guest header"
        assert 1 <= int(header.get("vcpus", "1")) <= image.MAX_VCPUS


def test_good_header_with_quotes_and_vcpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A valid header with a quoted description and vcpus=256 loads with those values."""
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path / "cache"))
    source = write_guest(tmp_path / "g.S", "mode=real vcpus=256 vm=sw_protected description='a \"quoted\" text'")
    guest = load_guest(str(source))
    assert (guest.mode.value, guest.vcpus, guest.vm_type.name, guest.description) == (
        "real",
        256,
        "SW_PROTECTED",
        'a "quoted" text',
    )


# --- an unprivileged user with a read-only checkout -----------------------------------------------


class Unprivileged:
    """Runs Python as user nobody (setpriv, no supplementary groups) with a home and cache of its own."""

    def __init__(self, home: Path, uid: int, gid: int, python: str) -> None:
        self.home, self.uid, self.gid, self.python = home, uid, gid, python
        site = Path(click.__file__).resolve().parent.parent  # where click and pytest are installed
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("VMM_", "PYTEST_", "PYTHON", "HYPOTHESIS"))}
        self.env = {
            **keep,
            "HOME": str(home),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)]),
        }

    def command(self, *args: str) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", *args]

    def run(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """``python *args`` as the unprivileged user, in its home."""
        return subprocess.run(
            self.command(self.python, *args),
            capture_output=True,
            text=True,
            cwd=self.home,
            env={**self.env, **(env or {})},
            timeout=timeout,
        )

    def vmm(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """`vmm *args` as the unprivileged user."""
        return self.run("-m", "vmm", *args, env=env)

    def owns(self, path: Path) -> bool:
        return path.stat().st_uid == self.uid


def unprivileged_user() -> Iterator[Unprivileged]:
    """User nobody, a home it owns under /tmp, and a Python it can start by itself (so the
    processes it starts can too: setpriv's own exec still holds root's capabilities). Skips
    unless this runs as root with setpriv."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run commands as user nobody")
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("needs a user named nobody")
    home = Path(tempfile.mkdtemp(prefix="vmm-nobody-"))  # not under tmp_path: pytest-of-root is 0700
    try:
        os.chown(home, user.pw_uid, user.pw_gid)
        candidates = dict.fromkeys([sys.executable, "/usr/bin/python3", shutil.which("python3") or ""])
        for python in filter(None, candidates):
            runner = Unprivileged(home, user.pw_uid, user.pw_gid, python)
            probe = subprocess.run(
                runner.command("/bin/sh", "-c", 'exec "$0" -c "import vmm, click, pytest"', python),
                capture_output=True,
                cwd=home,
                env=runner.env,
                timeout=60,
            )
            if probe.returncode == 0:
                break
        else:
            pytest.skip(f"user nobody cannot run any of {', '.join(filter(None, candidates))} with vmm")
        yield runner
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def nobody() -> Iterator[Unprivileged]:
    """User nobody with a home of its own (see unprivileged_user)."""
    yield from unprivileged_user()


def test_unprivileged_user_builds_own_guest_in_read_only_checkout(nobody: Unprivileged) -> None:
    """As user nobody (the checkout is read-only to it), a guest of its own builds into its cache
    by content, and a bundled guest whose build directory it cannot write builds there too. Before:
    both went to a build directory nobody can write, and the build failed."""
    build = (ROOT / "guest" / "build").stat()
    assert build.st_uid != nobody.uid and not build.st_mode & 0o002  # the checkout is read-only to nobody
    bundled_before = fresh_bundled_hello()
    source = user_hello(nobody.home / "mine", "hello from nobody")
    os.chown(source.parent, nobody.uid, nobody.gid)
    os.chown(source, nobody.uid, nobody.gid)
    read_only_build = nobody.home / "ro-build"  # root's, mode 0755: like an installed package's
    read_only_build.mkdir(mode=0o755)
    script = (
        "import json, sys; from pathlib import Path; from vmm import load_guest; "
        "mine = load_guest(sys.argv[1]); bundled = load_guest('hello', build_dir=Path(sys.argv[2])); "
        "print(json.dumps({'mine': mine.binary.hex(), 'bundled': bundled.binary.hex()}))"
    )
    proc = nobody.run("-c", script, str(source), str(read_only_build))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    images = {k: bytes.fromhex(v) for k, v in json.loads(proc.stdout).items()}
    assert b"hello from nobody" in images["mine"] and images["bundled"] == bundled_before[0]
    cache = nobody.home / ".cache" / "vmm" / "guests"
    mine_bin = cache / image.content_key(source)[:16] / "hello.bin"
    assert mine_bin.read_bytes() == images["mine"] and nobody.owns(mine_bin)
    assert len(list(cache.rglob("hello.bin"))) == 2  # its own and the bundled one, under two keys
    assert not any(read_only_build.iterdir())
    assert fresh_bundled_hello() == bundled_before


def test_unprivileged_boot_of_own_guest(nobody: Unprivileged) -> None:
    """`vmm boot` of its own guest as user nobody: the guest runs when nobody may open /dev/kvm;
    otherwise one line names /dev/kvm's real owner, group and mode and what gives access (exit 2),
    after the guest was built in nobody's cache (the build does not need /dev/kvm)."""
    source = user_hello(nobody.home / "mine", "hello from nobody's boot")
    os.chown(source.parent, nobody.uid, nobody.gid)
    proc = nobody.vmm("boot", str(source))
    if proc.returncode == 0:  # a host whose /dev/kvm lets everyone in
        assert "guest: hello from nobody's boot" in proc.stdout
    else:
        owner_group_mode, step = dev_kvm_words()
        message = one_line_error(proc)
        assert f"no read/write access to /dev/kvm ({owner_group_mode}: {step})" in message
    assert (nobody.home / ".cache" / "vmm" / "guests" / image.content_key(source)[:16] / "hello.bin").is_file()
