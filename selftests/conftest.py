"""The suite's set-up: vmm's pytest plugins (fixtures and gates; --ktap), loaded here when vmm is
not pip-installed (an installed vmm loads them through its pytest11 entry points, and pluggy
refuses to register one module twice)."""

from __future__ import annotations

import fnmatch
import importlib.metadata
import os
import platform
from pathlib import Path

import pytest

from vmm.tools import doctor

_installed = {ep.name for ep in importlib.metadata.entry_points(group="pytest11")}
pytest_plugins = [
    module
    for name, module in (("vmm", "vmm.tools.pytest_plugin"), ("vmm_ktap", "vmm.tools.ktap"))
    if name not in _installed
]


# --- no silent skips inside the nested kernels --------------------------------------------------
#
# Inside `vmm nested` (VMM_NESTED=1) a skip hides a kernel that lacks what it should have. Each
# nested kernel series has a list of the skips it is expected to produce, with the reason
# (selftests/nested-skips/<series>.txt); any other skip there fails the test.

SKIP_LISTS = Path(os.environ.get("VMM_NESTED_SKIPS_DIR") or doctor.SKIP_LISTS)


def kernel_series(release: str) -> str:
    """'6.12.117' -> '6.12'."""
    return ".".join(release.split(".")[:2])


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """In the nested kernel, turn a skip that is not on the kernel's list into a failure."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("VMM_NESTED") != "1" or not report.skipped or hasattr(report, "wasxfail"):
        return
    series = kernel_series(platform.release())
    allowed = doctor.read_skip_list(SKIP_LISTS / f"{series}.txt")
    if allowed is None:
        return  # a kernel of another series (vmm nested --kernel PATH): nothing to compare with
    reason = _skip_reason(report)
    if any(fnmatch.fnmatchcase(item.nodeid, p) and r in reason for p, r in allowed):
        return
    report.outcome = "failed"
    report.longrepr = (
        f"unexpected skip in the nested {series} kernel ({reason}); expected skips are listed "
        f"in selftests/nested-skips/{series}.txt"
    )
