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
:class:`Reporter`). Tasks nest: a task opened inside another is drawn below it. A loop whose
items are the steps (slots, rounds, clients) is ``for x in progress.each(items, "slots",
unit="slot")``: the bar moves by one per item done and names the item now running.

Threads: a new thread starts with an empty context, so it sees no reporter. Code that hands a
function to an engine that calls it from a thread of its own (Flower's simulation runs the
ServerApp in a thread) wraps it with :func:`bind` where it is created: the function then runs
with the creator's reporter and open tasks, from whichever thread calls it. Other processes
(Ray workers running Flower's ClientApps, SuperNodes) never see this process's reporter: what
they do is reported by the side that waits for them (the server's "clients replied" bars).
"""

from __future__ import annotations

import contextvars
import functools
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterable, Iterator, Protocol, TypeVar

_REPORTER: ContextVar["Reporter | None"] = ContextVar("fedit_progress_reporter", default=None)
_DEPTH: ContextVar[int] = ContextVar("fedit_progress_depth", default=0)
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


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

    @property
    def shown(self) -> bool:
        """Whether anything shows this task (False: every method is a no-op)."""
        return self._bar is not None

    def update(self, n: float = 1, **values: Any) -> None:
        """Advance by ``n`` (0 to only change the values) and show ``values`` (e.g. loss=0.4)."""
        if self._bar is None:
            return
        if values:
            self.show(values)
        if n:
            self._bar.update(n)

    def show(self, values: dict[str, Any]) -> None:
        """Show ``values`` beside the bar (replacing those shown before)."""
        if self._bar is not None:
            self._bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in values.items()})

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


def each(items: Iterable[T], desc: str, unit: str = "it", total: float | None = None,
         label: Callable[[T], Any] | None = None) -> Iterator[T]:
    """``items`` one at a time inside a task that moves by one per item done (``total``: their
    number, ``len(items)`` when not given). Beside the bar, ``<unit>=<label(item)>`` (default
    ``k/total``) names the item now running, e.g. ``slot=2/5`` while slot 2 runs."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with task(desc, total=total, unit=unit) as bar:
        for k, item in enumerate(items):
            bar.show({unit: label(item) if label else (f"{k + 1}/{total}" if total else k + 1)})
            yield item
            bar.update(1)


def bind(fn: F) -> F:
    """``fn``, run from whichever thread calls it with the reporter and open tasks of the context
    that calls ``bind`` (a copy of this whole context: every ContextVar set here goes along)."""
    ctx = contextvars.copy_context()

    @functools.wraps(fn)
    def bound(*args, **kwargs):
        return ctx.copy().run(fn, *args, **kwargs)

    return bound  # type: ignore[return-value]


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
