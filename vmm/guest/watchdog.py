"""The run loop's clock: deadline_after() checks a timeout, and one Watchdog thread kicks the runs
whose deadline passed (vmm.guest.runner keeps one for the process)."""

from __future__ import annotations

import math
import threading
import time
from typing import Protocol

from vmm.errors import VmmError


class Kickable(Protocol):
    """What the watchdog kicks: a Runner (its _time_out() sets timed_out and kicks the vCPU)."""

    def _time_out(self) -> None: ...


def deadline_after(timeout: float | None) -> float | None:
    """The time.monotonic() at which ``timeout`` seconds from now end (None: no timeout); VmmError
    unless ``timeout`` is None or a finite number > 0 (nan, inf, 0 and negatives would not bound)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (0 < timeout < math.inf):
        raise VmmError(f"timeout {timeout!r}: expected a finite number of seconds > 0 (or None for no timeout)")
    return time.monotonic() + timeout


class Watchdog:
    """One daemon thread that kicks runners whose deadline passed. It sleeps until the earliest
    deadline (no polling) and holds a runner only while the runner is watched: run(),
    run_until_done() and run_all() stop watching when they end, whatever ends them."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._deadlines: dict[Kickable, float] = {}
        self._wake = math.inf  # when the thread wakes up next
        self._thread: threading.Thread | None = None

    def watch(self, runner: Kickable, deadline: float) -> None:
        """Kick ``runner`` (timed_out set) once time.monotonic() passes ``deadline``."""
        with self._cond:
            self._deadlines[runner] = deadline
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="vmm-watchdog", daemon=True)
                self._thread.start()
            if deadline < self._wake:
                self._cond.notify()

    def unwatch(self, runner: Kickable) -> None:
        """Forget ``runner`` (no reference to it is left here)."""
        with self._cond:
            self._deadlines.pop(runner, None)

    def watched(self) -> int:
        """How many runners are watched now."""
        with self._cond:
            return len(self._deadlines)

    def _loop(self) -> None:
        with self._cond:
            while True:
                self._wake = self._kick_due(time.monotonic())
                self._cond.wait(None if self._wake == math.inf else self._wake - time.monotonic())

    def _kick_due(self, now: float) -> float:
        """Kick the runners due by ``now``; the next deadline. (A function of its own so that no
        local variable keeps a runner alive while the thread sleeps.)"""
        for runner in [r for r, d in self._deadlines.items() if d <= now]:
            del self._deadlines[runner]
            runner._time_out()
        return min(self._deadlines.values(), default=math.inf)
