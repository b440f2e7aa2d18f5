"""Tests of vmm/ktap.py, the ``--ktap FILE`` pytest plugin: pytest is run on small test files."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

import vmm.tools.ktap  # noqa: F401  (imported up front so the inner runs find it whatever the cwd)

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.no_kvm  # pure host-side logic: not run again inside the nested kernel

DEMO = """
import pytest

@pytest.fixture
def broken():
    raise OSError("no /dev/kvm")

def test_pass():
    pass

def test_fail():
    assert 1 + 1 == 3, "arithmetic"

def test_skip():
    pytest.skip("needs a nested kernel")

@pytest.mark.xfail(reason="known bug")
def test_xfail():
    assert False

@pytest.mark.xfail(reason="maybe fixed")
def test_xpass():
    pass

def test_error(broken):
    pass
"""


def demo_ids(*names: str) -> list[str]:
    """Node ids of the named DEMO tests."""
    return [f"test_demo.py::test_{name}" for name in names]


@pytest.fixture(autouse=True)
def _only_our_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inner runs load vmm.tools.ktap by -p only, the same whether or not its entry point is installed."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")


def run(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, list[str]]:
    """Run pytest in-process with --ktap; return the result and the KTAP file's lines."""
    args = ("-p", "vmm.tools.ktap", "-W", "ignore::pytest.PytestAssertRewriteWarning", *args)
    result = pytester.runpytest(*args, "--ktap", "out/results.ktap", no_reraise_ctrlc=True)
    return result, (pytester.path / "out/results.ktap").read_text().splitlines()


def test_pass_fail_skip_lines(pytester: pytest.Pytester) -> None:
    """Pass, fail, skip give 'ok', '# diag' + 'not ok', 'ok # SKIP reason'; plan and totals."""
    pytester.makepyfile(test_demo=DEMO)
    _, lines = run(pytester, *demo_ids("pass", "fail", "skip"))
    assert lines[:3] == ["KTAP version 1", "1..3", "ok 1 test_demo.py::test_pass"]
    assert lines[3].startswith("# test_demo.py:11: AssertionError: arithmetic")
    assert lines[lines.index("not ok 2 test_demo.py::test_fail") - 1].startswith("# ")
    assert "ok 3 test_demo.py::test_skip # SKIP needs a nested kernel" in lines
    assert lines[-1] == "# Totals: pass:1 fail:1 xfail:0 xpass:0 skip:1 error:0"


def test_xfail_xpass_error_lines(pytester: pytest.Pytester) -> None:
    """xfail/xpass are 'ok' with XFAIL/XPASS directives; a fixture error is 'not ok # ERROR'."""
    pytester.makepyfile(test_demo=DEMO)
    _, lines = run(pytester, *demo_ids("xfail", "xpass", "error"))
    assert lines[:2] == ["KTAP version 1", "1..3"]
    assert lines[2] == "ok 1 test_demo.py::test_xfail # XFAIL known bug"
    assert lines[3] == "ok 2 test_demo.py::test_xpass # XPASS maybe fixed"
    assert lines[4].startswith("# ") and "OSError: no /dev/kvm" in lines[4]
    assert lines[5] == "not ok 3 test_demo.py::test_error # ERROR setup failed"
    assert lines[-1] == "# Totals: pass:0 fail:0 xfail:1 xpass:1 skip:0 error:1"


def test_junitxml_alongside(pytester: pytest.Pytester) -> None:
    """--junitxml still writes its report, with the same counts, when --ktap is given too."""
    pytester.makepyfile(test_demo=DEMO)
    result, lines = run(pytester, "--junitxml", "out/junit.xml")
    result.assert_outcomes(passed=1, failed=1, skipped=1, xfailed=1, xpassed=1, errors=1)
    suite = ET.parse(pytester.path / "out/junit.xml").getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("6", "1", "1")
    assert lines[1] == "1..6"
    assert lines[-1] == "# Totals: pass:1 fail:1 xfail:1 xpass:1 skip:1 error:1"


def test_interrupted_session_still_writes(pytester: pytest.Pytester) -> None:
    """Ctrl-C mid-run still writes the file: done tests, the cut-off one as ERROR, no later ones."""
    pytester.makepyfile(test_int="def test_a(): pass\ndef test_b(): raise KeyboardInterrupt\ndef test_c(): pass\n")
    result, lines = run(pytester)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert lines[:4] == [
        "KTAP version 1",
        "1..2",
        "ok 1 test_int.py::test_a",
        "not ok 2 test_int.py::test_b # ERROR interrupted",
    ]
    assert lines[-1] == "# Totals: pass:1 fail:0 xfail:0 xpass:0 skip:0 error:1"


def test_collection_error_and_odd_names(pytester: pytest.Pytester) -> None:
    """Unimportable / self-skipping modules get ERROR / SKIP lines; '#' in an id is escaped."""
    pytester.makepyfile(
        test_bad="import no_such_module_here\n",
        test_ids="import pytest\n@pytest.mark.parametrize('x', ['a#b'])\ndef test_p(x): pass\n",
        test_off="import pytest\npytest.skip('no SEV here', allow_module_level=True)\n",
    )
    _, lines = run(pytester, "--continue-on-collection-errors")
    assert lines[-4:-1] == [  # collection reports come before any test runs
        "not ok 1 test_bad.py # ERROR collection failed",
        "ok 2 test_off.py # SKIP no SEV here",
        "ok 3 test_ids.py::test_p[a%23b]",
    ]
    assert lines[-1] == "# Totals: pass:1 fail:0 xfail:0 xpass:0 skip:1 error:1"
