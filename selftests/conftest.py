"""The suite's set-up: vmm's pytest plugins (fixtures and gates; --ktap), loaded here when vmm is
not pip-installed (an installed vmm loads them through its pytest11 entry points, and pluggy
refuses to register one module twice)."""

from __future__ import annotations

import importlib.metadata

_installed = {ep.name for ep in importlib.metadata.entry_points(group="pytest11")}
pytest_plugins = [
    module
    for name, module in (("vmm", "vmm.tools.pytest_plugin"), ("vmm_ktap", "vmm.tools.ktap"))
    if name not in _installed
]
