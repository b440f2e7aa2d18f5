"""The binding: every ioctl and syscall vmm issues, one type per kernel fd (as rust-vmm's
kvm-ioctls splits ``ioctls/{system,vm,vcpu}.rs``). Nothing here knows about guests or tests."""

from .exits import Exit, ExitHandlers
from .gmem import GuestMemfd
from .stats import Stats
from .system import Kvm
from .uapi import Cap, ExitReason, GmemFlag, MemFlag, VmType
from .vcpu import Vcpu
from .vm import Vm

__all__ = [
    "Cap",
    "Exit",
    "ExitHandlers",
    "ExitReason",
    "GmemFlag",
    "GuestMemfd",
    "Kvm",
    "MemFlag",
    "Stats",
    "Vcpu",
    "Vm",
    "VmType",
]
