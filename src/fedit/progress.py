"""Progress of long operations, reported by library code and shown by whoever installs a reporter.

Library code opens a task and moves it; it never prints::

    from fedit import progress

    with progress.task("target vectors", total=len(requests), unit="request") as bar:
        for ...:
            bar.update(1, loss=0.42)   # advance, and show the latest values beside the bar

Nothing is shown unless a reporter is installed for the current context (a
:class:`contextvars.ContextVar`, so no module-level state changes and concurrent callers each
see their own): the CLI installs :class:`TqdmReporter` (bars on stderr) unless ``--json`` or
``--quiet``; a web page or a test can install its own (anything with ``open``, see
:class:`Reporter`). Tasks nest: a task opened inside another is drawn below it.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator, Protocol

_REPORTER: ContextVar["Reporter | None"] = ContextVar("fedit_progress_reporter", default=None)
_DEPTH: ContextVar[int] = ContextVar("fedit_progress_depth", default=0)


class Bar(Protocol):
    """What a reporter returns for one task."""

    def update(self, n: float) -> None: ...

    def set_postfix(self, values: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class Reporter(Protocol):
    """Shows tasks: ``open`` is called when library code starts one (``depth`` 0 = outermost)."""

    def open(self, desc: str, total: float | None, unit: str, depth: int, initial: float = 0) -> Bar: ...


class Task:
    """A running task as library code sees it; every method is a no-op when nothing is shown."""

    def __init__(self, bar: Bar | None):
        self._bar = bar

    def update(self, n: float = 1, **values: Any) -> None:
        """Advance by ``n`` (0 to only change the values) and show ``values`` (e.g. loss=0.4)."""
        if self._bar is None:
            return
        if values:
            self._bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in values.items()})
        if n:
            self._bar.update(n)

    def callback(self) -> Callable[[int], None]:
        """``update`` as a one-argument function, for APIs that take ``progress=callable``."""
        return lambda n: self.update(n)


@contextmanager
def task(desc: str, total: float | None = None, unit: str = "it", initial: float = 0,
         enabled: bool = True) -> Iterator[Task]:
    """Open a task for the ``with`` block (closed however it ends); see the module docstring."""
    reporter = _REPORTER.get()
    if reporter is None or not enabled:
        yield Task(None)
        return
    depth = _DEPTH.get()
    bar = reporter.open(desc, total, unit, depth, initial)
    token = _DEPTH.set(depth + 1)
    try:
        yield Task(bar)
    finally:
        _DEPTH.reset(token)
        bar.close()


def active() -> bool:
    """Whether a reporter is installed (for callers that would otherwise skip work to report)."""
    return _REPORTER.get() is not None


@contextmanager
def reporting(reporter: Reporter | None) -> Iterator[None]:
    """Install ``reporter`` for the ``with`` block (None: show nothing)."""
    token = _REPORTER.set(reporter)
    try:
        yield
    finally:
        _REPORTER.reset(token)


class TqdmReporter:
    """tqdm bars on a stream (stderr). Nested tasks sit below their parent and vanish when done;
    a task shorter than ``delay`` seconds is never drawn."""

    DELAY = 0.5  # seconds before a task is drawn

    def __init__(self, file=None, delay: float | None = None):
        self.file = file if file is not None else sys.stderr
        self.delay = self.DELAY if delay is None else delay

    def open(self, desc: str, total: float | None, unit: str, depth: int, initial: float = 0) -> Bar:
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.file, position=depth,
                    leave=depth == 0, delay=self.delay, dynamic_ncols=True)
