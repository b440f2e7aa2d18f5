"""userfaultfd(2): the syscall, its ioctls and struct uffd_msg (include/uapi/linux/userfaultfd.h),
ctypes only. One type per kernel fd: a Userfaultfd issues its ioctls through KvmFd.ioctl (one
ioctl path, one error type naming the ioctl, errno and arguments)."""

from __future__ import annotations

import ctypes
import os
from ctypes import c_int64, c_uint8, c_uint16, c_uint32, c_uint64

from vmm.errors import KvmError

from . import fd as _fd
from . import syscalls
from .uapi import _IOC_DIRSHIFT, _IOC_READ, _IOC_SIZESHIFT, _IOC_TYPESHIFT, _IOC_WRITE

UFFDIO = 0xAA
UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1  # not used: KVM's own accesses (GUP from KVM_RUN) are kernel-mode faults


class uffdio_api(ctypes.Structure):
    _fields_ = [("api", c_uint64), ("features", c_uint64), ("ioctls", c_uint64)]


class uffdio_range(ctypes.Structure):
    _fields_ = [("start", c_uint64), ("len", c_uint64)]


class uffdio_register(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", c_uint64), ("ioctls", c_uint64)]


class uffdio_copy(ctypes.Structure):
    _fields_ = [("dst", c_uint64), ("src", c_uint64), ("len", c_uint64), ("mode", c_uint64), ("copy", c_int64)]


class uffd_pagefault(ctypes.Structure):
    _fields_ = [("flags", c_uint64), ("address", c_uint64), ("ptid", c_uint32), ("pad", c_uint32)]


class uffd_msg(ctypes.Structure):
    """struct uffd_msg (32 bytes, packed): the event, then its arguments (only pagefault here)."""

    _pack_ = 1
    _fields_ = [
        ("event", c_uint8),
        ("reserved1", c_uint8),
        ("reserved2", c_uint16),
        ("reserved3", c_uint32),
        ("pagefault", uffd_pagefault),
    ]


def _uffd_ioc(direction: int, nr: int, struct: type) -> int:
    return (direction << _IOC_DIRSHIFT) | (ctypes.sizeof(struct) << _IOC_SIZESHIFT) | (UFFDIO << _IOC_TYPESHIFT) | nr


UFFDIO_API = _uffd_ioc(_IOC_READ | _IOC_WRITE, 0x3F, uffdio_api)
UFFDIO_REGISTER = _uffd_ioc(_IOC_READ | _IOC_WRITE, 0x00, uffdio_register)
UFFDIO_UNREGISTER = _uffd_ioc(_IOC_READ, 0x01, uffdio_range)
UFFDIO_WAKE = _uffd_ioc(_IOC_READ, 0x02, uffdio_range)
UFFDIO_COPY = _uffd_ioc(_IOC_READ | _IOC_WRITE, 0x03, uffdio_copy)
UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_THREAD_ID = 1 << 8
MSG_SIZE = ctypes.sizeof(uffd_msg)

_fd.name_ioctls(
    {"UFFDIO_API": UFFDIO_API, "UFFDIO_REGISTER": UFFDIO_REGISTER, "UFFDIO_UNREGISTER": UFFDIO_UNREGISTER}
    | {"UFFDIO_WAKE": UFFDIO_WAKE, "UFFDIO_COPY": UFFDIO_COPY}
)


class Userfaultfd(_fd.KvmFd):
    """One userfaultfd: UFFDIO_API handshake at creation, then register ranges and resolve faults."""

    kind = "userfaultfd"

    def __init__(self, flags: int = os.O_CLOEXEC | os.O_NONBLOCK, features: int = 0) -> None:
        try:
            fd = syscalls.userfaultfd(flags)
        except OSError as e:
            raise KvmError("userfaultfd", e.errno or 0, f"flags={flags:#x}", "syscall") from None
        super().__init__(fd)
        api = uffdio_api(api=UFFD_API, features=features)
        try:
            self.ioctl(UFFDIO_API, api)
        except BaseException:
            self.close()
            raise
        self.features, self.ioctls = int(api.features), int(api.ioctls)

    def register(self, start: int, length: int, mode: int = UFFDIO_REGISTER_MODE_MISSING) -> int:
        """UFFDIO_REGISTER [start, start+length) of this process's memory; the ioctls it allows."""
        reg = uffdio_register(range=uffdio_range(start, length), mode=mode)
        self.ioctl(UFFDIO_REGISTER, reg)
        return int(reg.ioctls)

    def unregister(self, start: int, length: int) -> None:
        """UFFDIO_UNREGISTER [start, start+length)."""
        self.ioctl(UFFDIO_UNREGISTER, uffdio_range(start, length))

    def copy(self, dst: int, src: int, length: int, mode: int = 0) -> int:
        """UFFDIO_COPY ``length`` bytes from host address ``src`` to the registered ``dst`` and wake
        the faulting threads; the bytes copied. EEXIST (another reader resolved it) is a KvmError."""
        req = uffdio_copy(dst=dst, src=src, len=length, mode=mode)
        self.ioctl(UFFDIO_COPY, req)
        return int(req.copy)

    def wake(self, start: int, length: int) -> None:
        """UFFDIO_WAKE the threads waiting on [start, start+length)."""
        self.ioctl(UFFDIO_WAKE, uffdio_range(start, length))

    def read_msgs(self, buf: bytearray) -> list[tuple[int, int, int]]:
        """The pending messages as (event, flags, address); [] when none (non-blocking fd)."""
        try:
            n = os.readv(self.fd, [buf])
        except BlockingIOError:
            return []
        except OSError as e:
            raise self.error("read", e.errno or 0) from None
        out = []
        for off in range(0, n - n % MSG_SIZE, MSG_SIZE):
            m = uffd_msg.from_buffer(buf, off)
            out.append((int(m.event), int(m.pagefault.flags), int(m.pagefault.address)))
        return out


def available() -> tuple[bool, str]:
    """Whether this process can create a userfaultfd that catches kernel-mode faults (KVM's), and
    what that needs (root, or vm.unprivileged_userfaultfd=1, in a kernel with CONFIG_USERFAULTFD)."""
    try:
        Userfaultfd().close()
    except KvmError:
        return False, "userfaultfd(2) (CONFIG_USERFAULTFD; root or vm.unprivileged_userfaultfd=1)"
    return True, "userfaultfd(2)"
