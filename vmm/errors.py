"""Exception types: one for failed ioctls, one for user-facing errors."""

from __future__ import annotations

import errno as _errno
import os


class VmmError(Exception):
    """A user mistake or unmet requirement; str() is a one-line message for the CLI."""


class KvmError(VmmError, OSError):
    """A KVM ioctl (or a syscall on a KVM fd) failed: names the call, errno and decoded arguments."""

    def __init__(self, call: str, err: int, args: str = "", fd_kind: str = "") -> None:
        self.call = call
        self.errno_name = _errno.errorcode.get(err, f"E{err}")
        self.arguments = args
        self.fd_kind = fd_kind
        OSError.__init__(self, err, os.strerror(err))

    def __str__(self) -> str:
        where = f" on {self.fd_kind} fd" if self.fd_kind else ""
        args = f"({self.arguments})" if self.arguments else ""
        return f"{self.call}{args}{where} failed: {self.errno_name} ({self.errno}): {self.strerror}"


class GuestError(VmmError):
    """The guest stopped in a way the test did not expect (assert, shutdown, timeout, bad exit)."""
