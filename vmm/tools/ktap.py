"""pytest plugin: ``--ktap FILE`` writes the run's results as KTAP v1, like a kselftest.

Why: CI and kernel tooling read KTAP (Documentation/dev-tools/ktap.rst); pytest-tap does not
work with pytest 9. Loaded by the ``vmm_ktap`` pytest11 entry point once the package is
pip-installed, else by ``-p vmm.tools.ktap`` (never both: pluggy refuses to register one module under
two names). One result line per test, in run order; modules that fail to import or skip
themselves get one too. The file is written at session finish, so an interrupted run still gets
a valid file covering the tests that ran.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Outcome -> (TAP result, KTAP directive); kselftest's ksft_test_result_code() spells them so.
_LINE = {
    "pass": ("ok", ""),
    "fail": ("not ok", ""),
    "xfail": ("ok", "XFAIL"),
    "xpass": ("ok", "XPASS"),
    "skip": ("ok", "SKIP"),
    "error": ("not ok", "ERROR"),
}
_MAX_DIAG_LINES = 10


@dataclass
class _Result:
    """One test's combined outcome over its setup/call/teardown reports."""

    outcome: str = "pass"
    reason: str = ""  # goes after the directive
    diag: list[str] = field(default_factory=list)  # '# ' lines printed before the result line
    done: bool = False  # teardown reported; a test cut short by Ctrl-C never gets there


def _clean(text: str) -> str:
    """Make text fit on a result line: no newline, no '#' (it starts the directive)."""
    return " ".join(text.split()).replace("#", "%23")


def _message(report: pytest.TestReport | pytest.CollectReport, root: Path) -> list[str]:
    """Short failure/skip message of a report: 'file:line: error' and at most a few lines."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # skip: (path, lineno, "Skipped: reason")
        return [longrepr[2].removeprefix("Skipped: ")]
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        path = Path(crash.path)
        where = path.relative_to(root) if path.is_relative_to(root) else path
        lines = f"{where}:{crash.lineno}: {crash.message}".splitlines()
    else:  # plain string reprs (xpass strict, collection errors): the tail says most
        lines = [ln for ln in str(longrepr).splitlines() if ln.strip()][-_MAX_DIAG_LINES:]
    return lines[:_MAX_DIAG_LINES] or [report.outcome]


class KtapReporter:
    """Collects reports during the session and writes the KTAP file at its end."""

    def __init__(self, path: Path, root: Path) -> None:
        self.path, self.root = path, root
        self.results: dict[str, _Result] = {}  # nodeid -> result, in run order

    def _set(self, nodeid: str, outcome: str, msg: list[str], reason: str = "") -> None:
        """Record an outcome; a failure or error is kept, later phases only add diagnostics."""
        res = self.results.setdefault(nodeid, _Result())
        if res.outcome not in ("fail", "error"):
            res.outcome, res.reason = outcome, reason
        res.diag += msg

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Fold one phase report into the test's result."""
        self.results.setdefault(report.nodeid, _Result()).done = report.when == "teardown"
        xfail_reason = getattr(report, "wasxfail", None)
        if report.failed:
            msg = _message(report, self.root)
            if report.when == "call":
                self._set(report.nodeid, "fail", msg)
            else:
                self._set(report.nodeid, "error", msg, f"{report.when} failed")
        elif report.skipped:
            if xfail_reason is not None:
                self._set(report.nodeid, "xfail", [], xfail_reason)
            else:
                self._set(report.nodeid, "skip", [], _message(report, self.root)[0])
        elif report.when == "call" and xfail_reason is not None:
            self._set(report.nodeid, "xpass", [], xfail_reason)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        """A module that fails to import or skips itself is a result of its own, as in JUnit XML."""
        nodeid = report.nodeid or "."
        if report.failed:
            self._set(nodeid, "error", _message(report, self.root), "collection failed")
        elif report.skipped:
            self._set(nodeid, "skip", [], _message(report, self.root)[0])
        if nodeid in self.results:
            self.results[nodeid].done = True

    def render(self, exitstatus: int) -> str:
        """The whole KTAP document."""
        out = ["KTAP version 1", f"1..{len(self.results)}"]
        totals = dict.fromkeys(_LINE, 0)
        for num, (nodeid, res) in enumerate(self.results.items(), start=1):
            outcome, reason = (res.outcome, res.reason) if res.done else ("error", "interrupted")
            totals[outcome] += 1
            out += [f"# {line}" for line in res.diag]
            result, directive = _LINE[outcome]
            line = f"{result} {num} {_clean(nodeid)}"
            if directive:
                line += f" # {directive} {_clean(reason)}".rstrip()
            out.append(line)
        if exitstatus == pytest.ExitCode.INTERRUPTED:
            out.append("# session interrupted: the tests after this point did not run")
        counts = " ".join(f"{k}:{v}" for k, v in totals.items())
        out.append(f"# Totals: {counts}")
        return "\n".join(out) + "\n"

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        """Write the file atomically, also after Ctrl-C or -x."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(self.render(exitstatus))
        os.replace(tmp, self.path)

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        """Say where the file went, as --junitxml does."""
        terminalreporter.write_sep("-", f"generated KTAP file: {self.path}")


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register --ktap."""
    group = parser.getgroup("ktap", "KTAP v1 report")
    group.addoption("--ktap", metavar="FILE", default=None, help="write KTAP v1 results to FILE")


def pytest_configure(config: pytest.Config) -> None:
    """Start the reporter on the main process only (xdist workers report to it)."""
    path = config.getoption("ktap", None)
    if path and not hasattr(config, "workerinput"):
        reporter = KtapReporter(Path(path).resolve(), config.rootpath)
        config.pluginmanager.register(reporter, "vmm-ktap-reporter")
