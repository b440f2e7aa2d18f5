"""The host side of a nested run: which test kernel, which accelerator, which Python."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from vmm.errors import VmmError
from vmm.paths import CHECKOUT, cache_dir

KERNEL_ENV = "VMM_TEST_KERNEL"
BUILD_HINT = "build one with scripts/build-test-kernel --version VERSION (20-50 min on 2 cores) or pass --kernel PATH"
DEFAULT_VERSION = "6.12"
KERNEL_VERSIONS = ("6.12", "7.3")  # what `make test` runs; any X.Y works if a kernel for it exists
_VERSION = re.compile(r"\d+\.\d+")


def kernel_file(version: str) -> str:
    """The file name of a test kernel: the same in ../shared/kernels and in the cache."""
    return f"bzImage-{version}-swprot"


def cached_kernel(version: str = DEFAULT_VERSION) -> Path:
    """The path scripts/build-test-kernel --version VERSION installs its bzImage to."""
    return cache_dir() / "kernels" / kernel_file(version)


def shared_kernel(version: str = DEFAULT_VERSION, checkout: Path = CHECKOUT) -> Path:
    """The prebuilt kernel a CI machine keeps beside the checkout (../shared/kernels)."""
    return (checkout.parent / "shared" / "kernels" / kernel_file(version)).resolve()


def find_kernel(explicit: str | os.PathLike[str] | None, *, checkout: Path = CHECKOUT) -> Path:
    """Pick the test kernel. ``explicit`` is a version (6.12, 7.3: the cached build, then
    ../shared/kernels) or a path; without it: $VMM_TEST_KERNEL, then version 6.12."""
    if explicit and _VERSION.fullmatch(str(explicit)) and not Path(explicit).exists():
        return _kernel_for(str(explicit), checkout)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise VmmError(f"kernel {path} (--kernel) does not exist; {BUILD_HINT}")
        return path
    env = os.environ.get(KERNEL_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise VmmError(f"kernel {path} (${KERNEL_ENV}) does not exist; {BUILD_HINT}")
        return path
    return _kernel_for(DEFAULT_VERSION, checkout)


def _kernel_for(version: str, checkout: Path) -> Path:
    """The cached build of ``version``, else the shared prebuilt one."""
    tried = (cached_kernel(version), shared_kernel(version, checkout))
    for path in tried:
        if path.is_file():
            return path
    raise VmmError(
        f"no {version} test kernel found (tried {tried[0]}, {tried[1]}); build one with "
        f"scripts/build-test-kernel --version {version} or pass --kernel PATH"
    )


def kernel_version_of(path: Path) -> str | None:
    """The version a test kernel's file name says (bzImage-7.3-swprot -> 7.3), if any."""
    m = re.fullmatch(r"bzImage-(\d+\.\d+)-swprot", path.name)
    return m.group(1) if m else None


def nested_virt_available() -> tuple[bool, str]:
    """Whether QEMU with -accel kvm can give its guest VMX/SVM (so the guest gets a /dev/kvm)."""
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError as e:
        return False, f"/dev/kvm not usable: {os.strerror(e.errno or 0)}"
    try:
        flags: set[str] = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.partition(":")[2].split())
    except OSError as e:
        return False, f"cannot read /proc/cpuinfo: {e.strerror}"
    provider = next((m for m in ("kvm_pvm", "kvm_intel", "kvm_amd") if Path("/sys/module", m).exists()), "?")
    if "vmx" in flags:
        module = "kvm_intel"
    elif "svm" in flags:
        module = "kvm_amd"
    else:
        return False, f"host CPU exposes neither vmx nor svm (/dev/kvm is served by {provider})"
    param = Path("/sys/module", module, "parameters", "nested")
    try:
        value = param.read_text().strip()
    except OSError:
        return False, f"{module} is not loaded (/dev/kvm is served by {provider}), so no nested virtualization"
    if value in ("Y", "y", "1"):
        return True, f"{module} nested={value}"
    return False, f"{module} nested={value}: enable with 'modprobe {module} nested=1'"


def choose_accel(accel: str = "auto") -> tuple[list[str], list[str], str]:
    """QEMU accelerator and CPU arguments plus a description; auto prefers nested KVM over TCG."""
    if accel == "auto":
        ok, why = nested_virt_available()
        accel = "kvm" if ok else "tcg"
        note = f"auto: {why}"
    else:
        note = "requested"
    if accel == "kvm":
        return ["-accel", "kvm"], ["-cpu", "host"], f"kvm ({note})"
    if accel == "tcg":
        # single-threaded TCG: QEMU 7.2's multi-threaded TCG races the kernel's int3-based text
        # patching (int3 oopses seen at boot and mid-suite), which round-robin TCG cannot
        return ["-accel", "tcg,thread=single"], ["-cpu", "max"], f"tcg ({note})"
    raise VmmError(f"unknown accelerator {accel!r}: use auto, kvm or tcg")


def guest_python(checkout: Path) -> Path:
    """The interpreter to run inside: the checkout's venv, else this one (both visible via 9p)."""
    venv = checkout / ".venv" / "bin" / "python"
    return venv if venv.exists() else Path(sys.executable)


def ktap_plugin_args(python: Path, checkout: Path) -> list[str] | None:
    """Arguments that make pytest accept --ktap (already loaded, or -p vmm.tools.ktap); None if impossible."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    for extra in ([], ["-p", "vmm.tools.ktap"]):
        if extra and not (checkout / "vmm" / "tools" / "ktap.py").exists():
            continue
        try:
            out = subprocess.run(
                [str(python), "-m", "pytest", *extra, "--noconftest", "-p", "no:cacheprovider", "--help"],
                cwd=checkout,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return None
        if "--ktap" in out:
            return extra
    return None


def is_inside(path: Path, parent: Path) -> bool:
    """Whether path is parent or below it."""
    return path == parent or parent in path.parents
