"""vmm/kvm/uffd.py against the real <linux/userfaultfd.h> (sizes, offsets, ioctl numbers, from gcc),
and its errors: a refused UFFDIO_* call is a KvmError naming the ioctl, errno and arguments; the
userfaultfd pager refuses what it cannot page."""

from __future__ import annotations

import ctypes
import errno
import mmap
import subprocess
from pathlib import Path

import pytest

from vmm import HUGE_PAGE_SIZE, PAGE_SIZE, Backing, Cap, Kvm, KvmError, Machine, VmmError
from vmm.kvm import syscalls, uffd
from vmm.memory.paging import PageSource
from vmm.memory.uffd_paging import UffdPager

STRUCTS = {
    "uffdio_api": (uffd.uffdio_api, ("api", "features", "ioctls")),
    "uffdio_range": (uffd.uffdio_range, ("start", "len")),
    "uffdio_register": (uffd.uffdio_register, ("range", "mode", "ioctls")),
    "uffdio_copy": (uffd.uffdio_copy, ("dst", "src", "len", "mode", "copy")),
    "uffd_msg": (uffd.uffd_msg, ("event",)),
}
NUMBERS = (
    "UFFDIO_API",
    "UFFDIO_REGISTER",
    "UFFDIO_UNREGISTER",
    "UFFDIO_WAKE",
    "UFFDIO_COPY",
    "UFFD_API",
    "UFFDIO_REGISTER_MODE_MISSING",
    "UFFD_EVENT_PAGEFAULT",
    "UFFD_FEATURE_MISSING_SHMEM",
)


@pytest.mark.no_kvm
def test_layout_matches_headers(tmp_path: Path) -> None:
    """Every struct size and field offset, and every number, as gcc computes them from the header
    (plus the pagefault address at offset 16 of struct uffd_msg, where read_msgs takes it)."""
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <sys/ioctl.h>", "#include <linux/userfaultfd.h>"]
    lines.append("int main(void) {")
    expect = []
    for name, (cls, fields) in STRUCTS.items():
        lines.append(f'printf("%zu\\n", sizeof(struct {name}));')
        expect.append(ctypes.sizeof(cls))
        for f in fields:
            lines.append(f'printf("%zu\\n", offsetof(struct {name}, {f}));')
            expect.append(getattr(cls, f).offset)
    lines.append('printf("%zu\\n", offsetof(struct uffd_msg, arg.pagefault.address));')
    expect.append(uffd.uffd_msg.pagefault.offset + uffd.uffd_pagefault.address.offset)
    for n in NUMBERS:
        lines.append(f'printf("%llu\\n", (unsigned long long)({n}));')
        expect.append(getattr(uffd, n))
    lines.append("return 0; }")
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines) + "\n")
    subprocess.run(["gcc", "-o", str(tmp_path / "layout"), str(src)], check=True)
    got = [int(x) for x in subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True).stdout.split()]
    assert got == expect


@pytest.mark.no_kvm
def test_refused_ioctls_name_themselves() -> None:
    """A range that is not page aligned, and a copy to memory not registered: KvmError with the
    UFFDIO_* name, errno and the struct's fields; the fd stays usable."""
    if not uffd.available()[0]:
        pytest.skip(f"needs {uffd.available()[1]}")
    with uffd.Userfaultfd() as u, syscalls.raw_mapping(2 * PAGE_SIZE, 3, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as mem:
        with pytest.raises(KvmError) as e:
            u.register(mem + 1, PAGE_SIZE)
        assert e.value.errno == errno.EINVAL and "UFFDIO_REGISTER" in str(e.value) and "start=" in str(e.value)
        with pytest.raises(KvmError) as e:
            u.copy(mem, mem + PAGE_SIZE, PAGE_SIZE)
        assert "UFFDIO_COPY" in str(e.value), e.value
        assert u.register(mem, 2 * PAGE_SIZE) & (1 << 3)  # _UFFDIO_COPY allowed on the registered range
        assert u.read_msgs(bytearray(uffd.MSG_SIZE)) == []  # nothing pending: non-blocking


def test_uffd_pager_refuses_what_it_cannot_page(kvm: Kvm) -> None:
    """Bad fetch units, uneven handler splits, a range past its memslot or one with a guest_memfd."""
    src = PageSource.from_bytes(b"")
    with Machine(kvm=kvm) as m:
        m.add_memory(1 << 32, HUGE_PAGE_SIZE)
        for kw, what in (({"fetch": 8192}, "fetch unit"), ({"handlers": 3}, "slices"), ({"handlers": 0}, "slices")):
            with pytest.raises(VmmError, match=what):
                UffdPager(m.memory, 1 << 32, HUGE_PAGE_SIZE, src, **kw)  # type: ignore[arg-type]
        with pytest.raises(VmmError, match="one memfd-only memslot"):
            UffdPager(m.memory, 1 << 32, 2 * HUGE_PAGE_SIZE, src)
        if m.vm.check_extension(Cap.GUEST_MEMFD):  # on this VM type (6.12: only private-memory VMs)
            m.add_memory(2 << 32, HUGE_PAGE_SIZE, Backing.GUEST_MEMFD)
            with pytest.raises(VmmError, match="one memfd-only memslot"):
                UffdPager(m.memory, 2 << 32, HUGE_PAGE_SIZE, src)
