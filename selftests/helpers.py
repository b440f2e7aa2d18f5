"""Helpers the selftests share: the kernel selftests' TEST_ASSERT_EQ(get_ucall(vcpu, NULL), UCALL_*)
and TEST_ASSERT(r == -1 && errno == E...), and set_memory_region_test's constants."""

from __future__ import annotations

import errno
import gc
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from vmm import Ucall, UcallCmd

ROOT = Path(__file__).resolve().parent.parent  # the checkout

# set_memory_region_test.c: a 2 MiB region (one large page) at 3 GiB in slot 10
MEM_REGION_SIZE = 0x200000
MEM_REGION_GPA = 0xC0000000
MEM_REGION_SLOT = 10
NO_GUEST_MEMFD = 0xFFFFFFFF  # the kernel test's guest_memfd = -1 when deleting a slot


def expect_sync(result: object, stage: int | None = None) -> Ucall:
    """``result`` is a SYNC ucall (of ``stage`` when given); returns it for its arguments."""
    ok = isinstance(result, Ucall) and result.cmd == UcallCmd.SYNC and (stage is None or result.stage == stage)
    assert ok, f"expected a SYNC{'' if stage is None else f'({stage})'} ucall, got {result}"
    return result  # type: ignore[return-value]


def expect_done(result: object) -> None:
    """``result`` is the DONE ucall: the guest passed."""
    assert isinstance(result, Ucall) and result.cmd == UcallCmd.DONE, f"expected DONE, got {result}"


def expect_errno(err: int, call: Callable[[], object], why: str = "") -> None:
    """``call`` must fail with ``err`` (the kernel's TEST_ASSERT(r == -1 && errno == err, why))."""
    with pytest.raises(OSError) as e:
        call()
    assert e.value.errno == err, f"{why}: expected {errno.errorcode[err]}, got {e.value}"


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """(major, minor) of the running kernel ('7.3.4-amd64' -> (7, 3)). Only for behaviour changes no
    capability reveals; name the version that changed it where this is used."""
    m = re.match(r"(\d+)\.(\d+)", release or platform.release())
    assert m, f"cannot read a version from {release or platform.release()!r}"
    return int(m.group(1)), int(m.group(2))


def gmem_bind_overlap_errno() -> int:
    """What kvm_gmem_bind() returns for a guest_memfd range already bound to another memslot: EINVAL
    until Linux 7.2, EEXIST from 7.2 on (no capability says which)."""
    return errno.EEXIST if kernel_version() >= (7, 2) else errno.EINVAL


def run_vmm(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`vmm ARGS` as a user runs it, from the checkout: a real process, its exit status and output as they are."""
    return subprocess.run(
        [sys.executable, "-m", "vmm", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def one_line_error(proc: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """Assert the process failed with ``code`` and a single 'vmm: ...' line, no traceback."""
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmm: "), proc.stderr
    return lines[0]


def open_fds() -> set[int]:
    """This process's open fds."""
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def mapping_count() -> int:
    """Lines of /proc/self/maps: an unmapped kvm_run page or guest memory shows here."""
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


@contextmanager
def no_gc() -> Iterator[None]:
    """Closing must not depend on the garbage collector: keep it off while fds and maps are counted."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
