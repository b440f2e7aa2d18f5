"""Guest images: find a bundled guest by name, assemble GNU-as sources (cpp + as + ld + objcopy)
into flat binaries, and read the ``vmm-guest:`` header line that says how to boot them."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .layout import IMAGE_END, IMAGE_GPA
from .x86 import Mode
from vmm.errors import VmmError
from vmm.paths import cache_dir
from vmm.kvm.uapi import VmType

_HEADER = re.compile(r"vmm-guest:(.*)")


def guest_dir() -> Path:
    """Where the bundled guest sources live: the checkout's guest/, or the installed vmm/guest/sources."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent.parent / "guest", here / "sources"):
        if (candidate / "include" / "vmm.h").is_file():
            return candidate
    raise VmmError("bundled guests not found (expected guest/ beside vmm/)")


@dataclass(frozen=True)
class GuestImage:
    """A flat binary to load at IMAGE_GPA, and what its source says about booting it."""

    name: str
    binary: bytes  # loaded at IMAGE_GPA; __FILE__ in its asserts is relative to source.parent
    mode: Mode = Mode.LONG
    vcpus: int = 1
    source: Path | None = None
    description: str = ""
    vm_type: VmType = VmType.DEFAULT  # SW_PROTECTED: the guest needs private memory


def bundled() -> dict[str, Path]:
    """Bundled guest sources by name."""
    return {p.stem: p for p in sorted(guest_dir().glob("*.S"))}


def read_header(source: Path) -> dict[str, str]:
    """The ``key=value`` words after ``vmm-guest:`` in a guest source's first lines."""
    with open(source, errors="replace") as f:
        for _, line in zip(range(10), f):
            m = _HEADER.search(line)
            if m:
                words = shlex.split(m.group(1).replace("*/", ""))
                return dict(w.split("=", 1) for w in words if "=" in w)
    return {}


def toolchain_missing() -> list[str]:
    """Tools needed to assemble guests that are not on PATH."""
    return [t for t in ("cpp", "as", "ld", "objcopy") if shutil.which(t) is None]


def assemble(source: Path, out_dir: Path) -> Path:
    """cpp | as | ld | objcopy ``source`` into ``out_dir/<name>.bin`` (an ELF with symbols beside it)."""
    missing = toolchain_missing()
    if missing:
        raise VmmError(f"cannot assemble {source}: {', '.join(missing)} not found (install binutils and cpp)")
    include = guest_dir() / "include"
    linker_script = guest_dir() / "guest.ld"
    out_dir.mkdir(parents=True, exist_ok=True)
    elf, binary = out_dir / f"{source.stem}.elf", out_dir / f"{source.stem}.bin"
    with tempfile.TemporaryDirectory() as tmp:
        pre, obj = Path(tmp) / "pre.s", Path(tmp) / "guest.o"
        steps = [
            ["cpp", "-nostdinc", "-undef", "-D__ASSEMBLY__", f"-I{include}", source.name, "-o", str(pre)],
            ["as", "--64", "-o", str(obj), str(pre)],
            ["ld", "-nostdlib", "-static", "-T", str(linker_script), "-o", str(elf), str(obj)],
            ["objcopy", "-O", "binary", str(elf), str(binary)],
        ]
        for cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=source.parent)
            if proc.returncode:
                lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Assembler messages" not in ln]
                first = lines[0] if lines else f"exit status {proc.returncode}"
                raise VmmError(f"{cmd[0]} failed for {source}: {first}")
    return binary


def _stale(binary: Path, source: Path) -> bool:
    if not binary.exists():
        return True
    newest = max([source.stat().st_mtime] + [p.stat().st_mtime for p in (guest_dir() / "include").glob("*")])
    return binary.stat().st_mtime < newest


def _from_source(source: Path, out_dir: Path) -> GuestImage:
    binary = out_dir / f"{source.stem}.bin"
    if _stale(binary, source) and not toolchain_missing():
        binary = assemble(source, out_dir)
    elif not binary.exists():
        raise VmmError(f"{binary} is missing and {', '.join(toolchain_missing())} not found to build it")
    header = read_header(source)
    return _image(source.stem, binary.read_bytes(), header, source)


def _image(name: str, data: bytes, header: dict[str, str], source: Path | None) -> GuestImage:
    if not data:
        raise VmmError(f"guest {name}: empty binary")
    if IMAGE_GPA + len(data) > IMAGE_END:
        raise VmmError(f"guest {name}: {len(data)} bytes do not fit between {IMAGE_GPA:#x} and {IMAGE_END:#x}")
    try:
        mode = Mode(header.get("mode", "long"))
        vcpus = int(header.get("vcpus", "1"))
    except ValueError as e:
        raise VmmError(f"guest {name}: bad vmm-guest header: {e}") from None
    vm = header.get("vm", "default")
    if vm not in ("default", "sw_protected"):
        raise VmmError(f"guest {name}: bad vmm-guest header: vm={vm}")
    vm_type = VmType[vm.upper()]
    return GuestImage(name, data, mode, vcpus, source, header.get("description", ""), vm_type)


def load(spec: str, build_dir: Path | None = None) -> GuestImage:
    """A guest by bundled name, or a path to a .S source or a flat binary."""
    build_dir = build_dir or default_build_dir()
    path = Path(spec)
    if path.suffix in (".S", ".s") or path.exists() or os.sep in spec:
        if not path.exists():
            raise VmmError(f"guest file not found: {spec}")
        if not os.access(path, os.R_OK) or not path.is_file():
            raise VmmError(f"guest file not readable: {spec}")
        if path.suffix in (".S", ".s"):
            return _from_source(path, build_dir)
        data = path.read_bytes()
        if data[:4] == b"\x7fELF":
            raise VmmError(f"{spec} is an ELF file; vmm boots flat binaries (objcopy -O binary) or .S sources")
        return _image(path.stem, data, {}, None)
    sources = bundled()
    if spec not in sources:
        raise VmmError(f"no bundled guest named {spec!r}; known: {', '.join(sources)}")
    return _from_source(sources[spec], build_dir)


def default_build_dir() -> Path:
    """guest/build in a checkout; a per-user cache when the package directory is read-only."""
    d = guest_dir() / "build"
    if os.access(guest_dir(), os.W_OK) or d.is_dir():
        return d
    return cache_dir() / "guests"
