"""Long operations off the request thread: one worker thread runs jobs in order (one model per
server, so model work is never concurrent); the page polls a job's status by id.

A job's progress text is the stage the job reports through its ``progress`` callback, followed
by the tasks fedit's library reports while it runs (``fedit.progress``, where installed: e.g.
"target vectors 7/20 step, loss=0.42"), or the last INFO line fedit logs."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

from fedit.errors import FeditError

log = logging.getLogger(__name__)

Work = Callable[[Callable[[str], None]], Any]  # work(progress) -> JSON-able result


@dataclass
class Job:
    id: str
    kind: str
    state: str = "queued"  # queued, running, done, error
    progress: str = "waiting for the model"
    started: float | None = None
    ended: float | None = None
    result: Any = None
    error: str | None = None
    _work: Work | None = field(default=None, repr=False)

    def status(self) -> dict:
        """What the page polls: state, progress text, seconds so far, result or error message."""
        end = self.ended or time.time()
        return {"id": self.id, "kind": self.kind, "state": self.state, "progress": self.progress,
                "seconds": round(end - self.started, 1) if self.started else 0.0,
                "result": self.result, "error": self.error}


class _LogToJob(logging.Handler):
    """Shows fedit's INFO log lines emitted on the worker thread as the running job's progress."""

    def __init__(self, jobs: "Jobs"):
        super().__init__(logging.INFO)
        self.jobs = jobs

    def emit(self, record: logging.LogRecord) -> None:
        job = self.jobs.current
        if job is not None and record.thread == self.jobs.thread_id:
            job.progress = record.getMessage()


class TextReporter:
    """A ``fedit.progress`` reporter that writes one line of text: the stage, then every open task
    with its count and latest values, outermost first."""

    def __init__(self, show: Callable[[str], None]):
        self._show = show
        self.stage = ""
        self._open: list[_TextBar] = []

    def set_stage(self, text: str) -> None:
        self.stage = text
        self.render()

    def open(self, desc: str, total: float | None, unit: str, depth: int, initial: float = 0) -> "_TextBar":
        bar = _TextBar(self, desc, total, unit, initial)
        self._open.append(bar)
        self.render()
        return bar

    def render(self) -> None:
        self._show(" · ".join([self.stage] * bool(self.stage) + [b.text() for b in self._open]))

    def closed(self, bar: "_TextBar") -> None:
        self._open = [b for b in self._open if b is not bar]
        self.render()


@dataclass
class _TextBar:
    reporter: TextReporter
    desc: str
    total: float | None
    unit: str
    n: float = 0
    values: dict = field(default_factory=dict)

    def text(self) -> str:
        count = f"{self.n:g}/{self.total:g}" if self.total else f"{self.n:g}"
        extra = ", ".join(f"{k}={v}" for k, v in self.values.items())
        return f"{self.desc} {count} {self.unit}" + (f", {extra}" if extra else "")

    def update(self, n: float) -> None:
        self.n += n
        self.reporter.render()

    def set_postfix(self, values: dict) -> None:
        self.values = dict(values)
        self.reporter.render()

    def close(self) -> None:
        self.reporter.closed(self)


def _reporting(reporter: TextReporter):
    """Install ``reporter`` for fedit's library progress where this fedit has ``fedit.progress``."""
    try:
        from fedit import progress as library_progress
    except ImportError:
        return nullcontext()
    return library_progress.reporting(reporter)


class Jobs:
    """A queue of jobs run one at a time on a daemon thread."""

    def __init__(self, keep: int = 50):
        self._jobs: dict[str, Job] = {}
        self._queue: queue.Queue[Job] = queue.Queue()
        self._ids = itertools.count(1)
        self._keep = keep
        self.current: Job | None = None
        self._thread = threading.Thread(target=self._loop, name="fedit-ui-worker", daemon=True)
        self._thread.start()
        self.thread_id = self._thread.ident
        # fedit's INFO lines reach the job where the "fedit" logger lets them through (fedit ui does)
        logging.getLogger("fedit").addHandler(_LogToJob(self))

    def submit(self, kind: str, work: Work) -> Job:
        """Queue ``work(progress)``; returns the job at once (state "queued")."""
        job = Job(id=str(next(self._ids)), kind=kind, _work=work)
        self._jobs[job.id] = job
        for old in list(self._jobs)[:-self._keep]:
            if self._jobs[old].state in ("done", "error"):
                del self._jobs[old]
        self._queue.put(job)
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def pending(self) -> list[dict]:
        """Status of every job not yet ended, oldest first (a reloaded page resumes polling them)."""
        return [j.status() for j in list(self._jobs.values()) if j.state in ("queued", "running")]

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            self.current = job
            job.state, job.started = "running", time.time()

            def show(text: str, job: Job = job) -> None:
                job.progress = text

            reporter = TextReporter(show)
            try:
                with _reporting(reporter):
                    job.result = job._work(reporter.set_stage)
                job.state, job.progress = "done", "done"
            except FeditError as e:
                job.state, job.error = "error", str(e)
            except Exception as e:  # an unexpected failure: the page gets one line, the log the traceback
                log.error("job %s (%s) failed:\n%s", job.id, job.kind, traceback.format_exc())
                job.state, job.error = "error", f"{type(e).__name__}: {e}"
            finally:
                job.ended = time.time()
                job._work = None
                self.current = None
