"""Progress: library code reports through fedit.progress; the CLI draws bars on stderr unless --json/--quiet."""

import json

import pytest

from fedit import edit, progress
from fedit.cli.main import main
from fedit.data.loaders import load_records
from fedit.evaluate.runner import measure
from fedit.testing import tiny_model

from helpers import CORPUS, EIFFEL, FAST, JORDAN, resources


class Recorder:
    """A reporter that keeps every task: desc, total, depth and the updates it got."""

    def __init__(self):
        self.tasks = []

    def open(self, desc, total, unit, depth, initial=0):
        rec = self

        class _Bar:
            def __init__(self):
                self.t = {"desc": desc, "total": total, "unit": unit, "depth": depth, "n": initial, "updates": 0,
                          "postfix": [], "closed": False}
                rec.tasks.append(self.t)

            def update(self, n):
                self.t["n"] += n
                self.t["updates"] += 1

            def set_postfix(self, values):
                self.t["postfix"].append(dict(values))

            def close(self):
                self.t["closed"] = True

        return _Bar()


def test_nothing_is_reported_without_a_reporter_and_tasks_nest():
    with progress.task("outer", total=2) as t:
        t.update(1, loss=0.5)  # no reporter: a no-op
    rec = Recorder()
    with progress.reporting(rec):
        with progress.task("outer", total=2) as t:
            with progress.task("inner", total=3) as u:
                u.update(3)
            t.update(2)
        with pytest.raises(RuntimeError):
            with progress.task("failing", total=1):
                raise RuntimeError
    assert [(x["desc"], x["depth"], x["n"], x["closed"]) for x in rec.tasks] == [
        ("outer", 0, 2, True), ("inner", 1, 3, True), ("failing", 0, 0, True)]
    assert not progress.active()


def test_edit_reports_each_target_step_with_the_loss(tiny_cache):
    lm = tiny_model("gpt2")
    rec = Recorder()
    with progress.reporting(rec):
        edit(lm, [EIFFEL, JORDAN], method="memit", overrides={**FAST, "layers": [1, 2]},
             resources=resources(tiny_cache), apply=False)
    (t,) = [x for x in rec.tasks if x["desc"] == "target vectors"]
    assert t["unit"] == "step" and t["n"] == t["total"] == FAST["v_num_grad_steps"] and t["closed"]
    assert t["updates"] >= 2
    last = t["postfix"][-1]
    assert last["request"] == "1-2/2" and last["step"].endswith(f"/{FAST['v_num_grad_steps']}")
    assert float(last["nll"]) > 0


def test_measurement_moves_per_record_not_per_batch():
    lm = tiny_model("gpt2")
    records = load_records("counterfact", None, 6)
    rec = Recorder()
    with progress.reporting(rec):
        measure(lm, records)
    (t,) = [x for x in rec.tasks if x["desc"] == "measuring"]
    assert t["total"] == t["n"] == 6 and t["unit"] == "record"
    assert t["updates"] >= 5  # one batch of 32 probes holds about one CounterFact record


def _edit_argv(model_dir, tmp_path, *extra):
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps(FAST))
    return ["edit", "--method", "rome", "--prompt", "The {} is located in the city of", "--subject", "Eiffel Tower",
            "--target", "Rome", "--layers", "1", "--hparams", str(hp), "--corpus", str(CORPUS),
            "--model", str(model_dir), "--cache-dir", str(tmp_path / "cache"), *extra]


def test_cli_draws_bars_on_stderr_unless_json_or_quiet(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress.TqdmReporter, "DELAY", 0)  # draw even tasks shorter than the usual delay
    assert main(_edit_argv(tiny_model_dir, tmp_path)) == 0
    err = capsys.readouterr().err
    assert "target vectors" in err and "request=1/1" in err and "nll=" in err
    for flag in ("--json", "--quiet"):
        assert main(_edit_argv(tiny_model_dir, tmp_path, flag)) == 0
        captured = capsys.readouterr()
        assert "target vectors" not in captured.err and "%|" not in captured.err, captured.err
        if flag == "--json":
            assert "requests" in json.loads(captured.out)
