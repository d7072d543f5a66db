"""Target batches in forked one-thread worker processes (``v_workers``): the same z as one process."""

import os
import threading
import time

import pytest
import torch

from fedit import hparams_for, progress
from fedit.core.targets import compute_targets
from fedit.core.templates import flat
from fedit.core.workers import fork_map
from fedit.testing import tiny_model

from helpers import DARRIEUX, EIFFEL, FAST, JORDAN, resources


class _Recorder:
    def __init__(self):
        self.total, self.shown = 0.0, []

    def open(self, desc, total, unit, depth, initial=0):
        rec = self

        class Bar:
            def update(self, n):
                rec.total += n

            def set_postfix(self, values):
                rec.shown.append(values)

            def close(self):
                pass
        return Bar()


def _square(x, task):
    task.update(1, item=x)
    return x * x, torch.get_num_threads()


def test_fork_map_runs_every_item_in_one_thread_workers_and_forwards_progress():
    rec = _Recorder()
    token = progress._REPORTER.set(rec)
    try:
        with progress.task("squares", total=6) as bar:
            got = dict(fork_map(_square, list(range(6)), 2, bar))
    finally:
        progress._REPORTER.reset(token)
    assert {k: v[0] for k, v in got.items()} == {k: k * k for k in range(6)}
    assert {v[1] for v in got.values()} == {1}  # each worker runs one thread
    assert rec.total == 6 and sorted(s["item"] for s in rec.shown) == list(range(6))


def _boom(x, task):
    if x == 3:
        raise ValueError("item 3 is bad")
    return x


def test_fork_map_raises_a_workers_error_here_and_leaves_no_worker_behind():
    before = threading.active_count()
    with pytest.raises(ValueError, match="item 3 is bad"):
        list(fork_map(_boom, list(range(5)), 2))
    assert threading.active_count() == before  # the pool's threads are gone


def _die(x, task):
    if x == 1:
        os._exit(3)  # as the kernel's OOM killer would leave it
    time.sleep(0.2)
    return x


def test_a_worker_that_dies_is_an_error_not_a_hang():
    with pytest.raises(RuntimeError, match="worker process died"):
        list(fork_map(_die, list(range(4)), 2))


def _slow(x, task):
    time.sleep(30)
    return x


def test_a_caller_that_stops_early_stops_the_workers():
    import multiprocessing as mp
    import signal

    gen = fork_map(_slow, list(range(4)), 2)
    workers = []

    def look():
        workers.extend(mp.active_children())
        raise TimeoutError
    with pytest.raises(TimeoutError):
        with _deadline(1, look):
            next(gen)
    gen.close()  # the caller gives up: the workers are terminated, not left to finish their items
    assert len(workers) == 2 and all(w.exitcode == -signal.SIGTERM for w in workers)
    assert not mp.active_children()


class _deadline:
    """Call ``fire`` (which raises) in the main thread after ``s`` seconds (SIGALRM)."""

    def __init__(self, s, fire):
        self.s, self.fire = s, fire

    def __enter__(self):
        import signal

        self.old = signal.signal(signal.SIGALRM, lambda *_: self.fire())
        signal.alarm(self.s)

    def __exit__(self, *exc):
        import signal

        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)


def test_fork_map_with_one_worker_runs_in_order_here():
    assert list(fork_map(lambda x, t: -x, [1, 2, 3], 1)) == [(0, -1), (1, -2), (2, -3)]


@pytest.mark.parametrize("arch", ["gpt2", "gemma3_text"])
def test_targets_in_two_workers_equal_those_of_one_process(arch, tiny_cache):
    lm = tiny_model(arch)
    hp = hparams_for("memit", lm, {**FAST, "layers": [1, 2], "v_lr": 1.0})
    templates = flat(resources(tiny_cache).templates(lm, hp.context_template_length_params))
    reqs = [EIFFEL, JORDAN, DARRIEUX, JORDAN, EIFFEL]
    one = compute_targets(lm, reqs, templates, hp.target_config(), batch_size=2)
    two = compute_targets(lm, reqs, templates, hp.target_config(), batch_size=2, workers=2)
    for a, b in zip(one, two):
        assert a.steps == b.steps and a.history == pytest.approx(b.history, rel=1e-5, abs=1e-6)
        assert torch.allclose(a.z, b.z, rtol=1e-4, atol=1e-5 * float(a.z.norm())), (a.z - b.z).norm()
        assert torch.equal(a.h, b.h)


def test_v_workers_is_checked_and_gives_memit_the_same_delta(tiny_cache):
    import fedit
    from fedit.methods.hparams import HparamsError

    lm = tiny_model("gpt2")
    with pytest.raises(HparamsError, match="v_workers"):
        hparams_for("memit", lm, {**FAST, "v_workers": 0})
    base = {**FAST, "layers": [1, 2], "v_batch_size": 1}
    one = fedit.edit(lm, [EIFFEL, JORDAN, DARRIEUX], method="memit", overrides=base, apply=False,
                     resources=resources(tiny_cache)).deltas.deltas
    two = fedit.edit(lm, [EIFFEL, JORDAN, DARRIEUX], method="memit", overrides={**base, "v_workers": 2},
                     apply=False, resources=resources(tiny_cache)).deltas.deltas
    assert one.keys() == two.keys()
    for name in one:
        a, b = one[name], two[name]
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4 * float(a.norm())), (name, (a - b).norm())


class _Stop(Exception):
    pass


def test_an_eval_with_workers_reports_their_memory_and_resumes_with_another_count(tmp_path):
    from fedit.data.loaders import load_records
    from fedit.evaluate.report import markdown
    from fedit.evaluate.runner import EvalConfig, evaluate

    records = load_records("counterfact", n=4)
    cfg = EvalConfig(method="memit", batch_size=2, sequential=True, fluency_records=0)
    base = {**FAST, "layers": [1, 2], "v_batch_size": 1}
    res = resources(str(tmp_path / "c"))
    whole = evaluate(tiny_model("gpt2"), records, cfg, overrides=base, resources=res)
    ck, seen = tmp_path / "out" / "checkpoint", []

    def stop_after_one(n):
        seen.append(n)
        if len(seen) == 1:
            raise _Stop
    with pytest.raises(_Stop):  # the first batch with two workers ...
        evaluate(tiny_model("gpt2"), records, cfg, overrides={**base, "v_workers": 2}, resources=res,
                 progress=stop_after_one, checkpoint_dir=ck)
    # ... the rest with one: the worker count is not part of the run's identity
    resumed = evaluate(tiny_model("gpt2"), records, cfg, overrides=base, resources=res, checkpoint_dir=ck,
                       resume=True)
    assert resumed["resumed_after_batch"] == 1
    for key in ("efficacy_success", "paraphrase_success", "neighborhood_success", "efficacy_acc"):
        assert resumed["metrics"][key] == pytest.approx(whole["metrics"][key]), key
    report = evaluate(tiny_model("gpt2"), records, cfg, overrides={**base, "v_workers": 2}, resources=res)
    assert report["peak_rss_workers_mb"] > 0
    assert report["metrics"]["efficacy_acc"] == pytest.approx(whole["metrics"]["efficacy_acc"])
    assert "target workers" in markdown(report)
