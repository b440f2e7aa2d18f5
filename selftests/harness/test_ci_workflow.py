"""The CI workflow runs exactly the commands README.md tells users to run, and caches the kernel."""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.no_kvm  # pure host-side logic: not run again inside the nested kernel

ROOT = Path(__file__).resolve().parents[2]  # the checkout
README = ROOT / "README.md"
WORKFLOW = ROOT / ".github" / "workflows" / "nested.yml"
FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
SHELL_LANGS = {"sh", "bash", "shell", "console", ""}


def commands(script: str) -> list[str]:
    """Shell lines of a script or code block: comments, blanks and `$ ` prompts dropped, `&&` split."""
    out = []
    for line in script.splitlines():
        line = line.strip().removeprefix("$ ").strip()
        if not line or line.startswith("#"):
            continue
        out += [part.strip() for part in line.split("&&") if part.strip()]
    return out


def make_commands(lines: list[str]) -> list[str]:
    """The `make TARGET...` commands among lines, normalised to single spaces."""
    return [" ".join(w) for w in (shlex.split(c, comments=True) for c in lines) if w and w[0] == "make"]


def readme_command_block() -> list[str]:
    """The make commands of README.md's first shell code block that mentions `make test`."""
    if not README.exists():
        pytest.fail("README.md is missing: it must show the `make run` / `make test` commands")
    for lang, body in FENCE.findall(README.read_text()):
        cmds = make_commands(commands(body))
        if lang in SHELL_LANGS and "make test" in cmds:
            return cmds
    pytest.fail("README.md has no fenced shell block containing `make test`")


def load_workflow() -> dict[str, Any]:
    """The workflow as data (YAML 1.1 reads the key `on` as True; put it back)."""
    data = yaml.safe_load(WORKFLOW.read_text())
    if True in data:
        data["on"] = data.pop(True)
    return data


def steps() -> list[dict[str, Any]]:
    """All steps of all jobs, in order."""
    return [s for job in load_workflow()["jobs"].values() for s in job.get("steps", [])]


def workflow_make_commands() -> list[str]:
    """The make commands the workflow's `run:` steps execute, in order."""
    return make_commands([c for s in steps() if "run" in s for c in commands(s["run"])])


def test_readme_block_has_run_and_test() -> None:
    """README.md's command block shows `make run` and `make test` (what users are told to run)."""
    cmds = readme_command_block()
    assert "make run" in cmds and "make test" in cmds, cmds


def test_workflow_runs_the_readme_commands() -> None:
    """The workflow runs the same make commands as README.md's block, in the same order."""
    assert workflow_make_commands() == readme_command_block()


def test_workflow_triggers_and_job() -> None:
    """The workflow runs on push and pull requests and has a job with a bounded run time."""
    wf = load_workflow()
    assert {"push", "pull_request"} <= set(wf["on"])
    for name, job in wf["jobs"].items():
        assert "timeout-minutes" in job, f"job {name} has no timeout"


KERNELS = ("6.12", "7.3")


def kernel_steps(version: str) -> tuple[dict, dict]:
    """The cache step and the build step of one test kernel version."""
    all_steps = steps()
    caches = [
        s for s in all_steps if str(s.get("uses", "")).startswith("actions/cache@") and version in s["with"]["key"]
    ]
    builds = [s for s in all_steps if f"scripts/build-test-kernel --version {version}" in s.get("run", "")]
    assert len(caches) == 1 and len(builds) == 1, (version, caches, builds)
    return caches[0], builds[0]


@pytest.mark.parametrize("version", KERNELS)
def test_kernel_cached_on_fragment_hash(version: str) -> None:
    """Each kernel is cached under a key that hashes both of its config fragments and the build script."""
    cache, _ = kernel_steps(version)
    key = cache["with"]["key"]
    assert "hashFiles(" in key and "scripts/build-test-kernel" in key
    assert "scripts/test-kernel.config" in key and f"scripts/test-kernel-{version}.config" in key
    assert (ROOT / "scripts" / f"test-kernel-{version}.config").is_file()


@pytest.mark.parametrize("version", KERNELS)
def test_kernel_built_only_on_cache_miss_into_the_cached_path(version: str) -> None:
    """scripts/build-test-kernel --version V runs only on V's cache miss and installs into the cached paths."""
    all_steps = steps()
    cache, build = kernel_steps(version)
    assert build["if"].replace(" ", "") == f"steps.{cache['id']}.outputs.cache-hit!='true'"
    make_test = next(s for s in all_steps if "make test" in commands(s.get("run", "")))
    assert all_steps.index(cache) < all_steps.index(build) < all_steps.index(make_test)
    env = {k: str(v) for k, v in load_workflow()["jobs"]["test"].get("env", {}).items()}
    dest = subprocess.run(
        [str(ROOT / "scripts" / "build-test-kernel"), "--version", version, "--print-path"],
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent-home", **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert fnmatch.fnmatchcase(dest, cache["with"]["path"]) and fnmatch.fnmatchcase(
        dest + ".config", cache["with"]["path"]
    )
