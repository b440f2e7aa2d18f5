"""What this host's KVM offers, asked on the right fd, and which selftest groups will run or skip.

The requirement checks here are the ones the selftests use, so `vmm doctor` and pytest agree."""

from __future__ import annotations

import grp
import os
import platform
import pwd
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmm.errors import VmmError
from vmm.guest import image
from vmm.kvm import uffd
from vmm.kvm.caps import PRIVATE_MEM_REASON, gmem_flags, hypercall_exits, private_memory
from vmm.kvm.system import Kvm
from vmm.kvm.uapi import Cap, GmemFlag, VmType, enum_name
from vmm.paths import CHECKOUT

from . import nested, trace

# capabilities this project relies on, and the fd on which the answer means something
SYSTEM_CAPS = (
    Cap.USER_MEMORY,
    Cap.NR_MEMSLOTS,
    Cap.MAX_VCPUS,
    Cap.IMMEDIATE_EXIT,
    Cap.VM_TYPES,
    Cap.USER_MEMORY2,
    Cap.MEMORY_FAULT_INFO,
    Cap.EXIT_HYPERCALL,
)
VM_CAPS = (
    Cap.GUEST_MEMFD,
    Cap.GUEST_MEMFD_FLAGS,
    Cap.MEMORY_ATTRIBUTES,
    Cap.PRE_FAULT_MEMORY,
    Cap.USER_MEMORY2,
    Cap.MEMORY_FAULT_INFO,
    Cap.NR_MEMSLOTS,
    Cap.READONLY_MEM,
)


@dataclass(frozen=True)
class Group:
    """A selftest group and what it needs from the host."""

    name: str
    files: str
    check: Callable[[Kvm], tuple[bool, str]]


def _always(kvm: Kvm) -> tuple[bool, str]:
    return True, ""


def _flag(flag: GmemFlag) -> Callable[[Kvm], tuple[bool, str]]:
    return lambda kvm: (gmem_flags(kvm) & flag == flag, f"GUEST_MEMFD_FLAG_{flag.name} in KVM_CAP_GUEST_MEMFD_FLAGS")


def _toolchain(kvm: Kvm) -> tuple[bool, str]:
    return shutil.which("gcc") is not None, "gcc"


GROUPS = (
    Group("uapi layout vs kernel headers", "harness/test_uapi_layout.py", _toolchain),
    Group(
        "guest_memfd",
        "kvm/test_guest_memfd.py",
        lambda k: (k.check_extension(Cap.GUEST_MEMFD) > 0, "KVM_CAP_GUEST_MEMFD"),
    ),
    Group("guest_memfd mmap / guest_memfd-only slots", "kvm/test_guest_memfd.py", _flag(GmemFlag.MMAP)),
    Group("memslots", "kvm/test_set_memory_region.py", _always),
    Group(
        "binary stats",
        "kvm/test_kvm_binary_stats.py",
        lambda k: (k.check_extension(Cap.BINARY_STATS_FD) > 0, "KVM_CAP_BINARY_STATS_FD"),
    ),
    Group("CPU modes, ucall, exits", "harness/test_cpu_modes.py test_ucall.py test_exits.py", _always),
    Group("hypercall exits", "harness/test_exits.py", hypercall_exits),
    Group(
        "private memory",
        "kvm/x86/test_private_mem_*.py harness/test_conversion_*.py harness/test_huge_pages.py "
        "harness/test_memslots_vs_attributes.py",
        lambda k: (private_memory(k), PRIVATE_MEM_REASON),
    ),
    Group("demand paging: userfaultfd", "kvm/test_demand_paging.py", lambda k: uffd.available()),
    Group(
        "demand paging: memory attributes",
        "harness/test_paging_attributes.py test_demand_paging_cli.py",
        lambda k: (private_memory(k), PRIVATE_MEM_REASON),
    ),
)


def device_info(path: str) -> dict:
    """Owner, group and mode of the KVM device, and who besides root may open it read/write (the
    advice about the ``kvm`` group follows the device as it is, not a distribution's default)."""
    st = os.stat(path)
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    mode = stat.S_IMODE(st.st_mode)
    rw = 0o6
    who = ["root"] + ([owner] if (mode >> 6) & rw == rw and owner != "root" else [])
    if mode & rw == rw:
        users, advice = "every user", ""
    elif (mode >> 3) & rw == rw:
        users, advice = f"{', '.join(who)} and members of group {group}", f"other users: join group {group}"
    else:  # the mode gives the group nothing
        users = " and ".join(who) if len(who) > 1 else "root only"
        advice = f"other users: run as {' or '.join(reversed(who))}"
    return {"path": path, "owner": owner, "group": group, "mode": f"{mode:04o}", "users": users, "advice": advice}


def report(kvm: Kvm) -> dict:
    """Everything `vmm doctor` shows, as plain data (the --json output)."""
    types = sorted(kvm.vm_types())
    caps: dict[str, dict[str, int | None]] = {}
    for cap in sorted(set(SYSTEM_CAPS) | set(VM_CAPS)):
        caps[f"KVM_CAP_{cap.name}"] = {"/dev/kvm": kvm.check_extension(cap)}
    for t in types:
        try:
            with kvm.create_vm(t) as vm:
                for cap in VM_CAPS:
                    caps[f"KVM_CAP_{cap.name}"][_vm_label(t)] = vm.check_extension(cap)
        except OSError:
            continue
    flags = gmem_flags(kvm)  # one probe VM, not one per flag
    groups = []
    for g in GROUPS:
        try:
            ok, reason = g.check(kvm)
        except OSError as e:
            ok, reason = False, str(e)
        groups.append({"group": g.name, "files": g.files, "runs": ok, "needs": "" if ok else reason})
    nested_ok, nested_why = nested.nested_virt_available()
    kernels = []
    for version in nested.host.KERNEL_VERSIONS:
        try:
            path = str(nested.find_kernel(version))
        except VmmError:
            path = None
        kernels.append({"version": version, "path": path, "expected_skips": expected_skips(version)})
    try:
        kernel = str(nested.find_kernel(None))
    except VmmError as e:
        kernel = f"none ({e})"
    return {
        "kernel": platform.release(),
        "device": device_info(kvm.path),
        "kvm_api_version": kvm.api_version(),
        "vm_types": [_type_name(t) for t in types],
        "capabilities": caps,
        "guest_memfd_flags": [f.name for f in GmemFlag if flags & f],
        "private_memory": {"available": private_memory(kvm), "needs": PRIVATE_MEM_REASON},
        "demand_paging": {
            "attributes": private_memory(kvm),
            "userfaultfd": uffd.available()[0],
            "needs": ", ".join(
                ([] if private_memory(kvm) else [f"{PRIVATE_MEM_REASON} (attributes; runs in `vmm nested`)"])
                + ([] if uffd.available()[0] else [uffd.available()[1]])
            ),
        },
        "selftest_groups": groups,
        "guest_toolchain_missing": image.toolchain_missing(),
        "trace": trace.requirements(),
        "nested": {
            "available": nested_ok,
            "why": nested_why,
            "accel": nested.choose_accel("auto")[2],
            "kernel": kernel,
            "kernels": kernels,
        },
    }


SKIP_LISTS = CHECKOUT / "selftests" / "nested-skips"


def read_skip_list(path: Path) -> list[tuple[str, str]] | None:
    """A nested kernel's expected skips (selftests/nested-skips/<version>.txt): (test id pattern,
    reason text) pairs, one per line as `<pattern> | <reason>    # why`; None when there is no list."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    pairs = []
    for line in lines:
        entry = line.split("    #", 1)[0].strip()
        if entry and not entry.startswith("#"):
            pattern, _, reason = entry.partition("|")
            pairs.append((pattern.strip(), reason.strip()))
    return pairs


def expected_skips(version: str) -> list[str]:
    """The skips the nested runs expect on ``version``: every other test runs there, and any other
    skip fails the run (selftests/conftest.py)."""
    return [f"{pattern}: {reason}" for pattern, reason in read_skip_list(SKIP_LISTS / f"{version}.txt") or []]


def _type_name(t: int) -> str:
    name = enum_name(VmType, t)
    return f"KVM_X86_{name}_VM" if not name.isdigit() else f"type {t}"


def _vm_label(t: int) -> str:
    name = enum_name(VmType, t)
    return f"VM({name})" if not name.isdigit() else f"VM(type {t})"


def render(r: dict) -> str:
    """The human-readable doctor report."""
    dev = r["device"]
    out = [
        f"kernel            {r['kernel']}",
        f"device            {dev['path']} {dev['owner']}:{dev['group']} {dev['mode']}: usable by {dev['users']}"
        + (f"; {dev['advice']}" if dev["advice"] else ""),
        f"KVM API version   {r['kvm_api_version']}",
        f"VM types          {', '.join(r['vm_types'])}",
        "",
    ]
    columns = ["/dev/kvm"] + sorted({k for v in r["capabilities"].values() for k in v if k != "/dev/kvm"})
    out.append(f"{'capability':28}" + "".join(f"{c:>18}" for c in columns))
    for name, answers in r["capabilities"].items():
        cells = [answers.get(c) for c in columns]
        out.append(f"{name:28}" + "".join(f"{'-' if v is None else hex(v) if v > 9 else v:>18}" for v in cells))
    out.append("")
    out.append(f"guest_memfd flags {', '.join(r['guest_memfd_flags']) or 'none (KVM_CAP_GUEST_MEMFD_FLAGS is 0)'}")
    pm = r["private_memory"]
    out.append(
        "private memory    "
        + (
            "yes (KVM_X86_SW_PROTECTED_VM)"
            if pm["available"]
            else f"no: needs {pm['needs']}; run those tests with `vmm nested`"
        )
    )
    dp = r["demand_paging"]
    out.append(
        "demand paging     "
        + ("memory attributes (`vmm boot --demand-paging`)" if dp["attributes"] else "no memory attributes")
        + (", userfaultfd" if dp["userfaultfd"] else ", no userfaultfd")
        + ("" if dp["attributes"] and dp["userfaultfd"] else f"; needs {dp['needs']}")
    )
    out.append("")
    out.append("selftest groups")
    for g in r["selftest_groups"]:
        state = "runs" if g["runs"] else f"skips: needs {g['needs']}"
        out.append(f"  {g['group']:44} {state}")
    missing = r["guest_toolchain_missing"]
    out.append("")
    out.append(
        "guest toolchain   "
        + (
            "cpp, as, ld, objcopy found"
            if not missing
            else f"missing {', '.join(missing)} (bundled .bin files are used)"
        )
    )
    t = r["trace"]
    scope = "" if t["ptrace_scope"] is None else f", kernel.yama.ptrace_scope={t['ptrace_scope']}"
    out.append(
        "vmm trace         "
        + (
            f"python-ptrace {t['python_ptrace']}"
            if t["python_ptrace"]
            else "needs python-ptrace: pip install 'vmm[trace]'"
        )
        + scope
    )
    n = r["nested"]
    out.append(f"nested virt       {'yes' if n['available'] else 'no'} ({n['why']})")
    out.append(f"vmm nested uses   {n['accel']}; kernel {n['kernel']}")
    for k in n["kernels"]:
        where = k["path"] or "missing: scripts/build-test-kernel --version " + k["version"]
        out.append(f"nested {k['version']:<10} {where}")
        out.append(f"  runs every test that touches /dev/kvm except {len(k['expected_skips'])} expected skips:")
        out += [f"    {reason}" for reason in k["expected_skips"]]
    return "\n".join(out)
