"""vmm/uapi.py against the real <linux/kvm.h>: struct sizes, field offsets, ioctls and constants.

A generated C program compares every number with what gcc computes from the kernel's UAPI headers
(scripts/kernel-headers: 6.12 from Debian's linux-source unless /usr/include is new enough).
Never skipped: without gcc this fails, since a wrong offset here silently corrupts every ioctl.
"""

from __future__ import annotations

import ctypes
import enum
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmm.kvm import uapi

pytestmark = pytest.mark.no_kvm  # pure host-side logic: not run again inside the nested kernel

ROOT = Path(__file__).resolve().parents[2]  # the checkout
INCLUDES = ("stdio.h", "stddef.h", "linux/kvm.h", "linux/kvm_para.h")

# Enum class -> (prefix, suffix) of its members' macro names.
MACRO_NAME = {
    uapi.Cap: ("KVM_CAP_", ""),
    uapi.ExitReason: ("KVM_EXIT_", ""),
    uapi.VmType: ("KVM_X86_", "_VM"),
    uapi.MemFlag: ("KVM_MEM_", ""),
    uapi.GmemFlag: ("GUEST_MEMFD_FLAG_", ""),
    uapi.SystemEvent: ("KVM_SYSTEM_EVENT_", ""),
    uapi.InternalError: ("KVM_INTERNAL_ERROR_", ""),
    uapi.StatsType: ("KVM_STATS_TYPE_", ""),
    uapi.StatsUnit: ("KVM_STATS_UNIT_", ""),
    uapi.StatsBase: ("KVM_STATS_BASE_", ""),
}

# Newer than the 6.12 headers the check normally runs against: compared under #ifdef, so they
# are checked as soon as the headers have them, and only these may be missing.
NEWER_THAN_HEADERS = {
    "KVM_CAP_GUEST_MEMFD_FLAGS",  # 6.18
    "GUEST_MEMFD_FLAG_MMAP",  # 6.18
    "GUEST_MEMFD_FLAG_INIT_SHARED",  # 6.18
}

# Header-only structs whose C version ends in a flexible array: name and element type.
FLEXIBLE_ARRAYS: dict[type, tuple[str, type]] = {
    uapi.kvm_cpuid2: ("entries", uapi.kvm_cpuid_entry2),
    uapi.kvm_stats_desc: ("name", ctypes.c_char),
}

CType = type[ctypes.Structure] | type[ctypes.Union]
Check = tuple[str, str, int]  # (what, C expression, value in Python)


def ctypes_classes() -> list[CType]:
    """Every Structure/Union defined in vmm.uapi."""
    return [
        c
        for c in vars(uapi).values()
        if isinstance(c, type) and issubclass(c, (ctypes.Structure, ctypes.Union)) and c.__module__ == uapi.__name__
    ]


def members(cls: CType) -> Iterator[CType]:
    """Struct/union types inside cls, at any depth (array elements included)."""
    for _, ftype, *_ in cls._fields_:
        while issubclass(ftype, ctypes.Array):
            ftype = ftype._type_
        if isinstance(ftype, type) and issubclass(ftype, (ctypes.Structure, ctypes.Union)):
            yield ftype
            yield from members(ftype)


def nested_anonymous() -> set[CType]:
    """Types inside an outer class and named <outer>_<member> (kvm_run_io): untagged in C."""
    return {m for c in ctypes_classes() for m in members(c) if m.__name__.startswith(c.__name__ + "_")}


def field_checks(cls: CType, tag: str, pyname: str, cpath: str, base: int, seen: set[CType]) -> Iterator[Check]:
    """offsetof and sizeof of every field of cls at `base` in `tag`, descending into members.

    `cpath` is the C member path so far ("" or "hypercall."); ctypes anonymous members add no
    component, as C's anonymous unions do not.
    """
    seen.add(cls)
    anonymous = getattr(cls, "_anonymous_", ())
    for name, ftype, *_ in cls._fields_:
        offset = base + getattr(cls, name).offset
        py = f"{pyname}.{name}"
        member = cpath if name in anonymous else f"{cpath}{name}"
        if name not in anonymous:
            yield f"{py} offset", f"offsetof({tag}, {member})", offset
            yield f"{py} size", f"sizeof((({tag} *)0)->{member})", ctypes.sizeof(ftype)
        elem = getattr(ftype, "_type_", None) if issubclass(ftype, ctypes.Array) else None
        if isinstance(elem, type) and issubclass(elem, (ctypes.Structure, ctypes.Union)):
            ftype, member = elem, f"{member}[0]"
        if issubclass(ftype, (ctypes.Structure, ctypes.Union)):
            prefix = member if name in anonymous else f"{member}."
            yield from field_checks(ftype, tag, py, prefix, offset, seen)


def struct_checks(seen: set[CType]) -> Iterator[Check]:
    """Size and layout of every tagged struct/union, with flexible array members where declared."""
    untagged = nested_anonymous()
    for cls in ctypes_classes():
        if cls in untagged:
            continue
        tag = f"{'union' if issubclass(cls, ctypes.Union) else 'struct'} {cls.__name__}"
        yield f"{cls.__name__} size", f"sizeof({tag})", ctypes.sizeof(cls)
        yield from field_checks(cls, tag, cls.__name__, "", 0, seen)
        if cls in FLEXIBLE_ARRAYS:
            name, elem = FLEXIBLE_ARRAYS[cls]
            yield f"{cls.__name__}.{name} offset", f"offsetof({tag}, {name})", ctypes.sizeof(cls)
            yield f"{cls.__name__}.{name}[] element size", f"sizeof((({tag} *)0)->{name}[0])", ctypes.sizeof(elem)


def ioctl_size_checks() -> Iterator[Check]:
    """uapi.ioc_size() (what KvmFd.ioctl checks struct sizes against) against C's _IOC_SIZE()."""
    for name, value in vars(uapi).items():
        if name.startswith("KVM_") and type(value) is int and (value >> 8) & 0xFF == uapi.KVMIO:
            yield f"ioc_size({name})", f"_IOC_SIZE({name})", uapi.ioc_size(value)


def constants() -> dict[str, tuple[str, int]]:
    """Macro name -> (Python name, value): enum members by prefix, module-level ints as named."""
    out = {}
    for name, value in vars(uapi).items():
        if isinstance(value, enum.EnumType) and value.__module__ == uapi.__name__:
            assert value in MACRO_NAME, f"uapi.{name}: add its macro prefix to MACRO_NAME"
            prefix, suffix = MACRO_NAME[value]
            for member, v in value.__members__.items():
                out[f"{prefix}{member}{suffix}"] = (f"{name}.{member}", int(v))
        elif name.isupper() and type(value) is int:
            out[name] = (name, value)
    return out


def c_program(checks: list[Check], consts: dict[str, tuple[str, int]]) -> str:
    """C source printing one 'MISMATCH what: python=.. kernel=..' line per difference."""
    body = [f'\tCHECK("{what}: {expr}", {value}ULL, {expr});' for what, expr, value in checks]
    for macro, (pyname, value) in consts.items():
        absent = ('\tprintf("ABSENT %s\\n");' if macro in NEWER_THAN_HEADERS else '\tMISSING("%s");') % macro
        body += [f"#ifdef {macro}", f'\tCHECK("{pyname}: {macro}", {value}ULL, {macro});', "#else", absent, "#endif"]
    return "\n".join(
        [
            *(f"#include <{h}>" for h in INCLUDES),
            "static int bad, done;",
            "#define CHECK(what, py, k) do { unsigned long long k_ = (k); done++; if ((py) != k_) {"
            ' bad++; printf("MISMATCH %s: python=%llu (%#llx) kernel=%llu (%#llx)\\n",'
            " what, (py), (py), k_, k_); } } while (0)",
            '#define MISSING(m) do { bad++; printf("MISMATCH %s: not defined by the headers\\n", m); } while (0)',
            "int main(void)\n{",
            *body,
            '\tprintf("CHECKED %d\\n", done);\n\treturn bad != 0;\n}\n',
        ]
    )


@pytest.fixture(scope="module")
def layout_report(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Build and run the generated program; return its output lines."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc not found: the UAPI layout check needs it (project setup installs gcc)")
    got = subprocess.run(["bash", ROOT / "scripts/kernel-headers"], capture_output=True, text=True)
    if got.returncode != 0:
        pytest.fail(f"scripts/kernel-headers failed:\n{got.stderr}")
    headers = got.stdout.splitlines()[-1]
    checks, consts = [*struct_checks(set()), *ioctl_size_checks()], constants()
    src = tmp_path_factory.mktemp("uapi") / "uapi_layout.c"
    src.write_text(c_program(checks, consts))
    cc = subprocess.run(
        [gcc, "-std=gnu11", "-Wall", "-I", headers, src, "-o", src.with_suffix("")], capture_output=True, text=True
    )
    if cc.returncode != 0:
        pytest.fail(f"{src} does not compile against {headers}:\n{cc.stderr}")
    out = subprocess.run([src.with_suffix("")], capture_output=True, text=True).stdout.splitlines()
    absent = sum(line.startswith("ABSENT ") for line in out)
    expected = f"CHECKED {len(checks) + len(consts) - absent}"
    assert out[-1:] == [expected], f"{src.with_suffix('')} stopped early: {out[-3:]}"
    return out


def mismatches(lines: list[str], of_structs: bool) -> list[str]:
    """The program's MISMATCH lines about structs (labels start with a class name) or constants."""
    structs = {c.__name__ for c in ctypes_classes()}
    return [
        line
        for line in lines
        if line.startswith("MISMATCH ") and (line.split()[1].split(".")[0] in structs) == of_structs
    ]


def test_struct_layouts_match_headers(layout_report: list[str]) -> None:
    """sizeof/offsetof of every uapi struct, field and nested (anonymous) member match the C."""
    bad = mismatches(layout_report, of_structs=True)
    assert not bad, "\n".join(bad)


def test_constants_match_headers(layout_report: list[str]) -> None:
    """Every ioctl number, KVM_* constant and enum member equals the headers' macro of that name,
    and uapi.ioc_size() decodes each ioctl's struct size as _IOC_SIZE() does."""
    bad = mismatches(layout_report, of_structs=False)
    assert not bad, "\n".join(bad)


def test_every_struct_and_exemption_is_checked() -> None:
    """Every ctypes class is compared with a kernel counterpart; NEWER_THAN_HEADERS is not stale."""
    seen: set[CType] = set()
    for _ in struct_checks(seen):
        pass
    unchecked = {c.__name__ for c in ctypes_classes()} - {c.__name__ for c in seen}
    assert not unchecked, f"not reachable from any kernel struct: {sorted(unchecked)}"
    assert NEWER_THAN_HEADERS <= constants().keys(), NEWER_THAN_HEADERS - constants().keys()
