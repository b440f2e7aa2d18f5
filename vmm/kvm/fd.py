"""The one place ioctls are issued: a KVM file descriptor with context-managed close and typed errors."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from collections.abc import Collection
from typing import Any, Self

from vmm.errors import KvmError

from . import uapi

# request number -> "KVM_..." name, for error messages
_IOCTL_NAMES: dict[int, str] = {
    value: name
    for name, value in vars(uapi).items()
    if name.startswith("KVM_") and isinstance(value, int) and (value >> 8) & 0xFF == uapi.KVMIO
}


def name_ioctls(names: dict[str, int]) -> None:
    """Add request numbers of another ioctl family (userfaultfd's UFFDIO_*) to the names errors show."""
    _IOCTL_NAMES.update({value: name for name, value in names.items()})


def ioctl_name(request: int) -> str:
    """The "KVM_..." name of a request number vmm knows, else the number in hex."""
    return _IOCTL_NAMES.get(request, hex(request))


def describe(arg: Any) -> str:
    """Render an ioctl argument for an error message: struct fields by name, padding left out."""
    if isinstance(arg, ctypes.Structure):
        parts = []
        for field in arg._fields_:
            name = field[0]
            if name.startswith(("pad", "reserved")):
                continue
            value = getattr(arg, name)
            if isinstance(value, ctypes.Structure):  # nested (uffdio_register.range): its fields too
                value = describe(value)
            elif isinstance(value, ctypes.Array):
                value = list(value)
            elif isinstance(value, int) and value > 9:
                value = hex(value)
            parts.append(f"{name}={value}")
        return f"{type(arg).__name__}({', '.join(parts)})"
    return "" if arg is None else str(arg)


class KvmFd:
    """Owns one kernel fd; closes it exactly once (``with`` or ``close()``)."""

    kind = "kvm"

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def ioctl(self, request: int, arg: int | ctypes.Structure | bytearray = 0) -> int:
        """Issue one ioctl; a struct or bytearray argument is read and written in place. A struct
        whose size differs from the one encoded in ``request`` is refused before the kernel reads it
        (the selftests' kvm_do_ioctl() asserts the same at compile time)."""
        if self.fd < 0:
            raise ValueError(f"{ioctl_name(request)} on closed {self.kind} fd")
        if isinstance(arg, ctypes.Structure):
            size = uapi.ioc_size(request)
            if size and ctypes.sizeof(arg) != size:
                raise TypeError(
                    f"{ioctl_name(request)} takes a {size}-byte struct, "
                    f"got {type(arg).__name__} ({ctypes.sizeof(arg)} bytes): not issued"
                )
        try:
            if isinstance(arg, int):
                return fcntl.ioctl(self.fd, request, arg)
            return fcntl.ioctl(self.fd, request, arg, True)
        except OSError as e:
            raise self.error(request, e.errno or 0, arg) from None

    def retrying(self, request: int, arg: ctypes.Structure, errnos: Collection[int]) -> int:
        """ioctl() again while it fails with one of ``errnos`` (EINTR, EAGAIN: calls KVM may stop
        early, advancing ``arg`` in place so the next call resumes)."""
        while True:
            try:
                return self.ioctl(request, arg)
            except OSError as e:
                if e.errno not in errnos:
                    raise

    def error(self, request: int | str, err: int, arg: Any = None) -> KvmError:
        """Build the exception for a failed call on this fd; an EIO says whether KVM killed the VM."""
        name = request if isinstance(request, str) else ioctl_name(request)
        note = self.dead_vm_note() if err == errno.EIO else ""
        return KvmError(name, err, describe(arg), self.kind, note)

    def dead_vm_note(self) -> str:
        """Why this fd's calls fail with EIO, if a probe can tell; only VM and vCPU fds can."""
        return ""

    def fileno(self) -> int:
        """The fd, for select(), os.fstat() and pass_fds; ValueError once closed."""
        if self.fd < 0:
            raise ValueError(f"fileno() on closed {self.kind} fd")
        return self.fd

    @property
    def closed(self) -> bool:
        """True once close() ran."""
        return self.fd < 0

    def close(self) -> None:
        """Close the fd; a second close does nothing."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # safety net only; tests and CLI close explicitly
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"<{type(self).__name__} fd={self.fd}>"
