"""The one place ioctls are issued: a KVM file descriptor with context-managed close and typed errors."""

from __future__ import annotations

import ctypes
import fcntl
import os
from typing import Any, Self

from vmm.errors import KvmError

from . import uapi

# request number -> "KVM_..." name, for error messages
_IOCTL_NAMES: dict[int, str] = {
    value: name
    for name, value in vars(uapi).items()
    if name.startswith("KVM_") and isinstance(value, int) and (value >> 8) & 0xFF == uapi.KVMIO
}


def describe(arg: Any) -> str:
    """Render an ioctl argument for an error message: struct fields by name, padding left out."""
    if isinstance(arg, ctypes.Structure):
        parts = []
        for field in arg._fields_:
            name = field[0]
            if name.startswith(("pad", "reserved")):
                continue
            value = getattr(arg, name)
            if isinstance(value, ctypes.Array):
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
        """Issue one ioctl; a struct or bytearray argument is read and written in place."""
        try:
            if isinstance(arg, int):
                return fcntl.ioctl(self.fd, request, arg)
            return fcntl.ioctl(self.fd, request, arg, True)
        except OSError as e:
            raise self.error(request, e.errno or 0, arg) from None

    def error(self, request: int | str, err: int, arg: Any = None) -> KvmError:
        """Build the exception for a failed call on this fd."""
        name = request if isinstance(request, str) else _IOCTL_NAMES.get(request, hex(request))
        return KvmError(name, err, describe(arg), self.kind)

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
