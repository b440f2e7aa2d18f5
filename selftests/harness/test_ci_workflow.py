"""The CI workflow runs exactly the commands README.md tells users to run, and caches the kernel."""

from __future__ import annotations

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


def test_kernel_cached_on_fragment_hash() -> None:
    """The kernel build is cached under a key that hashes the config fragment and the build script."""
    caches = [s for s in steps() if str(s.get("uses", "")).startswith("actions/cache@")]
    assert len(caches) == 1, caches
    key = caches[0]["with"]["key"]
    assert "hashFiles(" in key and "scripts/test-kernel.config" in key and "scripts/build-test-kernel" in key


def test_kernel_built_only_on_cache_miss_into_the_cached_path() -> None:
    """scripts/build-test-kernel runs only on a cache miss and installs into the cached folder."""
    all_steps = steps()
    cache = next(s for s in all_steps if str(s.get("uses", "")).startswith("actions/cache@"))
    build = [s for s in all_steps if "scripts/build-test-kernel" in s.get("run", "")]
    assert len(build) == 1
    assert build[0]["if"].replace(" ", "") == f"steps.{cache['id']}.outputs.cache-hit!='true'"
    assert (
        all_steps.index(cache)
        < all_steps.index(build[0])
        < all_steps.index(next(s for s in all_steps if "make test" in commands(s.get("run", ""))))
    )
    env = {k: str(v) for k, v in load_workflow()["jobs"]["test"].get("env", {}).items()}
    dest = subprocess.run(
        [str(ROOT / "scripts" / "build-test-kernel"), "--print-path"],
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent-home", **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(dest).parent == Path(cache["with"]["path"])
