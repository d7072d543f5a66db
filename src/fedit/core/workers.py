"""Independent jobs over forked worker processes, one thread each, with their progress forwarded.

MEMIT's target batches are independent of each other, but one batch's products are small (a few
suffix columns through the upper blocks), so a second thread inside each product pays little.
Running whole batches side by side, one per core, does: :func:`fork_map` runs ``fn(item, task)``
for every item in ``workers`` processes forked from this one, so they share the model's weights
(copy-on-write) without pickling it, and yields ``(index, result)`` as each finishes.

Each worker runs one thread: a worker forked after this process used its OpenMP thread pool
hangs if it starts a pool of its own (GNU OpenMP is not fork-safe), and one thread per process
is the point anyway. CPU only: a process that holds a CUDA context cannot be forked safely, and
on a GPU one batch already fills the device. A worker's exception is raised here; a worker that
dies (killed, out of memory) is a RuntimeError here, not a hang; the workers are stopped however
the caller leaves (an exception, a ``break``, Ctrl-C). Results are those of running the items
here on one thread, because each item runs the same code on the same weights.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import queue
import threading
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterator, Sequence

import torch

from fedit import progress

# What the forked workers run, by call: set just before a pool forks, read by its children, which
# inherit it with the rest of this process's memory (nothing of it is pickled). Keyed per call so
# that calls from several threads at once each fork with their own job.
_JOBS: dict[int, tuple[Callable[[Any, progress.Task], Any], Sequence[Any], Any]] = {}
_LOCK = threading.Lock()
_NEXT = itertools.count()


class _QueueBar:
    """A progress bar inside a worker: every update goes to the parent through a queue."""

    def __init__(self, q):
        self._q = q

    def update(self, n: float) -> None:
        self._q.put(("update", n))

    def set_postfix(self, values: dict[str, Any]) -> None:
        self._q.put(("show", values))

    def close(self) -> None:
        pass


def _start() -> None:
    torch.set_num_threads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _run(job_k: tuple[int, int]):
    job, k = job_k
    fn, items, q = _JOBS[job]
    return k, fn(items[k], progress.Task(_QueueBar(q)) if q is not None else progress.Task(None))


def _forward(q, bar: progress.Task) -> None:
    while True:
        try:
            kind, value = q.get_nowait()
        except queue.Empty:
            return
        if kind == "update":
            bar.update(value)
        else:
            bar.show(value)


def fork_map(fn: Callable[[Any, progress.Task], Any], items: Sequence[Any], workers: int,
             bar: progress.Task = progress.Task(None)) -> Iterator[tuple[int, Any]]:
    """``(k, fn(items[k], task))`` for every k, in the order they finish, from ``workers`` forked
    one-thread processes; ``task`` moves ``bar`` here. ``workers`` ≤ 1 or one item: run here, in
    order, with this process's threads."""
    if workers <= 1 or len(items) <= 1:
        for k, item in enumerate(items):
            yield k, fn(item, bar)
        return
    if "fork" not in mp.get_all_start_methods():
        raise RuntimeError("worker processes need the 'fork' start method, which this platform lacks; "
                           "set the number of workers to 1")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        raise RuntimeError("worker processes cannot be forked from a process that uses CUDA; "
                           "set the number of workers to 1 on a GPU")
    ctx = mp.get_context("fork")
    q = ctx.Queue() if bar.shown else None
    with _LOCK:
        job = next(_NEXT)
        _JOBS[job] = (fn, items, q)
        pool = ProcessPoolExecutor(min(workers, len(items)), mp_context=ctx, initializer=_start)
        try:
            pending = {pool.submit(_run, (job, k)) for k in range(len(items))}  # forks the workers now
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            del _JOBS[job]
            raise
    try:
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            if q is not None:
                _forward(q, bar)
            for fut in done:
                try:
                    yield fut.result()
                except BrokenProcessPool as e:
                    raise RuntimeError(f"a worker process died before it finished (killed, or out of memory?): {e}; "
                                       "run again with fewer workers") from None
        pool.shutdown(wait=True)
        if q is not None:
            _forward(q, bar)  # what the workers sent while they exited
    finally:
        _JOBS.pop(job, None)
        if pending:  # left early (an error, the caller stopped, Ctrl-C): stop the workers now
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
