"""Guest images: find a bundled guest by name, assemble GNU-as sources (cpp + as + ld + objcopy)
into flat binaries, and read the ``vmm-guest:`` header line that says how to boot them.

Where binaries go: the bundled sources (guest/*.S) build into guest/build, as `make guests` does,
and are rebuilt when a source, an include or the linker script is newer than the binary (the same
mtime rule as the Makefile, so both agree on what is stale and share the same files). Any other
source (a user's guest) builds into the per-user cache under a key made of everything that goes
into the binary (``cache_dir()/guests/<sha256[:16]>/<stem>.bin``): it never replaces or boots a
bundled binary of the same name, two files with the same name do not collide, and a read-only
checkout or installation is never written to.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vmm.errors import VmmError
from vmm.kvm.uapi import VmType
from vmm.paths import cache_dir

from .layout import IMAGE_END, IMAGE_GPA
from .x86 import Mode

_HEADER = re.compile(r"vmm-guest:(.*)")
_QUOTE_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)

MAX_VCPUS = 256  # the same range as `vmm boot --vcpus`
VM_TYPES = ("default", "sw_protected")
HEADER_FIELDS = ("mode", "vcpus", "vm", "description")
# bump when the cache layout or what goes into a key changes
_CACHE_VERSION = b"vmm-guest-cache-1"


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
    """The ``key=value`` fields after ``vmm-guest:`` in a guest source's first lines, each checked:
    a bad one raises a one-line VmmError naming the file, the line and the field."""
    with open(source, errors="replace") as f:
        for lineno, line in zip(range(1, 11), f):
            m = _HEADER.search(line)
            if m:
                return parse_header(m.group(1).replace("*/", ""), f"{source}:{lineno}")
    return {}


def parse_header(text: str, where: str) -> dict[str, str]:
    """Split and check the words of a ``vmm-guest:`` line (shell quoting); ``where`` starts each error."""
    lex = shlex.shlex(text, posix=True)
    lex.whitespace_split, lex.commenters = True, ""
    words: list[str] = []
    try:
        while (word := lex.get_token()) is not None:
            words.append(word)
    except ValueError as e:  # "No closing quotation", "No escaped character": lex.token is the word so far
        field = lex.token.split("=", 1)[0] if "=" in lex.token else ""
        what = "unterminated quote" if "quotation" in str(e) else str(e).lower()
        raise VmmError(f"{where}: vmm-guest header{f' field {field}' if field else ''}: {what}") from None
    fields: dict[str, str] = {}
    for word in words:
        key, eq, value = word.partition("=")
        if not eq:
            raise VmmError(f"{where}: vmm-guest header: {word!r} is not a key=value field")
        if key not in HEADER_FIELDS:
            raise VmmError(f"{where}: vmm-guest header: unknown field {key!r} (known: {', '.join(HEADER_FIELDS)})")
        if key in fields:
            raise VmmError(f"{where}: vmm-guest header: field {key} given twice")
        fields[key] = value
    problem = _bad_field(fields)
    if problem:
        raise VmmError(f"{where}: vmm-guest header field {problem}")
    return fields


def _bad_field(fields: dict[str, str]) -> str:
    """What is wrong with the first bad field value ("" when none is)."""
    mode = fields.get("mode")
    if mode is not None and mode not in {m.value for m in Mode}:
        return f"mode={mode!r}: expected {' or '.join(m.value for m in Mode)}"
    vcpus = fields.get("vcpus")
    # digits only, and few of them: int() takes "+1", " 1", "1_0", and refuses over 4300 digits
    if vcpus is not None and not (re.fullmatch(r"[0-9]{1,4}", vcpus) and 1 <= int(vcpus) <= MAX_VCPUS):
        return f"vcpus={vcpus[:20]!r}: expected a whole number from 1 to {MAX_VCPUS}"
    vm = fields.get("vm")
    if vm is not None and vm not in VM_TYPES:
        return f"vm={vm!r}: expected {' or '.join(VM_TYPES)}"
    return ""


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
    elf, binary = out_dir / f"{source.stem}.elf", out_dir / f"{source.stem}.bin"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # build beside the outputs, then rename: a concurrent load never reads a half-written binary
        build = tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-")
    except OSError as e:
        hint = " (set VMM_CACHE_DIR to a writable directory)" if out_dir.is_relative_to(cache_dir()) else ""
        raise VmmError(f"cannot build {source}: cannot write to {out_dir}: {e.strerror}{hint}") from None
    with build as tmp:
        t = Path(tmp)
        steps = _commands(source.name, str(include), str(linker_script), *(str(t / n) for n in _OUTPUTS))
        for cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=source.parent)
            if proc.returncode:
                lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Assembler messages" not in ln]
                first = lines[0] if lines else f"exit status {proc.returncode}"
                raise VmmError(f"{cmd[0]} failed for {source}: {first}")
        os.replace(t / "guest.elf", elf)
        os.replace(t / "guest.bin", binary)
    return binary


_OUTPUTS = ("pre.s", "guest.o", "guest.elf", "guest.bin")


def _commands(source: str, include: str, lds: str, pre: str, obj: str, elf: str, binary: str) -> list[list[str]]:
    """The four build steps (the Makefile's guest/build/%.bin rule runs the same ones)."""
    return [
        ["cpp", "-nostdinc", "-undef", "-D__ASSEMBLY__", f"-I{include}", source, "-o", pre],
        ["as", "--64", "-o", obj, pre],
        ["ld", "-nostdlib", "-static", "-T", lds, "-o", elf, obj],
        ["objcopy", "-O", "binary", elf, binary],
    ]


def _local_includes(source: Path) -> list[Path]:
    """Files ``#include "..."`` pulls in from beside the including file (cpp looks there before -I),
    followed recursively; a conditional include counts too (a key over more files is still right)."""
    found: list[Path] = []
    todo = [source]
    while todo:
        current = todo.pop()
        try:
            text = current.read_text(errors="replace")
        except OSError:
            continue  # cpp will report it
        for name in _QUOTE_INCLUDE.findall(text):
            path = current.parent / name
            if path.is_file() and path.resolve() not in {p.resolve() for p in found}:
                found.append(path)
                todo.append(path)
    return found


def content_key(source: Path) -> str:
    """sha256 over everything that goes into ``source``'s binary: the build commands and flags, the
    source's name (``__FILE__`` in its asserts) and bytes, every file in guest/include, the linker
    script, and the files it includes from its own directory."""
    h = hashlib.sha256(_CACHE_VERSION)

    def add(label: str, data: bytes) -> None:
        h.update(f"\0{label}\0{len(data)}\0".encode())
        h.update(data)

    add("commands", json.dumps(_commands(source.name, "INCLUDE", "LDS", *_OUTPUTS)).encode())
    try:
        add("source", source.read_bytes())
        include = guest_dir() / "include"
        for path in sorted(include.rglob("*")):
            if path.is_file():
                add(f"include/{path.relative_to(include)}", path.read_bytes())
        add("linker script", (guest_dir() / "guest.ld").read_bytes())
        for path in _local_includes(source):
            add(f"local/{os.path.relpath(path, source.parent)}", path.read_bytes())
    except OSError as e:
        raise VmmError(f"cannot read {e.filename} to build {source}: {e.strerror}") from None
    return h.hexdigest()


def user_build_dir(source: Path) -> Path:
    """Where a guest that is not bundled builds: the per-user cache, under its content key."""
    return cache_dir() / "guests" / content_key(source)[:16]


def _stale(binary: Path, source: Path) -> bool:
    """A bundled binary older than its source, an include or the linker script (the Makefile's rule)."""
    if not binary.exists():
        return True
    inputs = [source, guest_dir() / "guest.ld", *(guest_dir() / "include").glob("*")]
    return binary.stat().st_mtime < max(p.stat().st_mtime for p in inputs if p.exists())


def _writable(directory: Path) -> bool:
    """Whether files can be created in ``directory`` (or, when it does not exist yet, beside it)."""
    target = directory if directory.exists() else directory.parent
    return target.is_dir() and os.access(target, os.W_OK | os.X_OK)


def _is_bundled(source: Path) -> bool:
    """Whether ``source`` is one of the bundled guest sources itself (not a file of the same name)."""
    bundled_source = bundled().get(source.stem)
    return bundled_source is not None and bundled_source.resolve() == source.resolve()


def _bundled_binary(source: Path, build_dir: Path) -> Path:
    """A bundled guest's binary in ``build_dir``, rebuilt when stale; built into the per-user cache
    instead when ``build_dir`` cannot be written (read-only checkout or installed package)."""
    binary = build_dir / f"{source.stem}.bin"
    if not _stale(binary, source):
        return binary
    if toolchain_missing():
        if binary.exists():
            return binary  # older than its source, but nothing here can rebuild it
        raise VmmError(f"{binary} is missing and {', '.join(toolchain_missing())} not found to build it")
    if _writable(build_dir):
        return assemble(source, build_dir)
    return _user_binary(source)


def _user_binary(source: Path) -> Path:
    """A guest's binary in the per-user cache, built there first when no build of the same content exists."""
    out_dir = user_build_dir(source)
    binary = out_dir / f"{source.stem}.bin"
    if binary.is_file():
        return binary
    return assemble(source, out_dir)


def _from_source(source: Path, build_dir: Path) -> GuestImage:
    header = read_header(source)  # a bad header is reported before anything is built
    binary = _bundled_binary(source, build_dir) if _is_bundled(source) else _user_binary(source)
    return _image(source.stem, binary.read_bytes(), header, source)


def _image(name: str, data: bytes, header: dict[str, str], source: Path | None) -> GuestImage:
    if not data:
        raise VmmError(f"guest {name}: empty binary")
    if IMAGE_GPA + len(data) > IMAGE_END:
        raise VmmError(f"guest {name}: {len(data)} bytes do not fit between {IMAGE_GPA:#x} and {IMAGE_END:#x}")
    problem = _bad_field(header)  # read_header checked a source's fields; this guards other callers
    if problem:
        raise VmmError(f"guest {name}: vmm-guest header field {problem}")
    mode = Mode(header.get("mode", "long"))
    vcpus = int(header.get("vcpus", "1"))
    vm_type = VmType[header.get("vm", "default").upper()]
    return GuestImage(name, data, mode, vcpus, source, header.get("description", ""), vm_type)


def load(spec: str, build_dir: Path | None = None) -> GuestImage:
    """A guest by bundled name, or a path to a .S source or a flat binary. Bundled guests build into
    ``build_dir`` (default guest/build); any other source into the per-user cache by content."""
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
    """guest/build beside the bundled sources (when it cannot be written, stale bundled guests build
    into the per-user cache instead)."""
    return guest_dir() / "build"
