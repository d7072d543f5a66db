"""Progress: library code reports through fedit.progress; the CLI draws bars on stderr unless --json/--quiet."""

import json
import threading

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


def test_each_names_the_running_item_and_bind_carries_the_reporter_into_a_thread():
    """Flower's simulation calls the ServerApp from a thread of its own: a bound function reports
    to the bars of the context that bound it, nested below its open task; an unbound one cannot."""
    rec = Recorder()
    seen = []

    def server():
        seen.append(progress.active())
        return [x for x in progress.each(["a", "b", "c"], "slots", unit="slot")]

    with progress.reporting(rec):
        with progress.task("run", total=1):
            plain = threading.Thread(target=server)
            plain.start()
            plain.join()
            bound = progress.bind(server)
        result = []
        worker = threading.Thread(target=lambda: result.append(bound()))
        worker.start()
        worker.join()
    assert seen == [False, True] and result == [["a", "b", "c"]]
    (t,) = [x for x in rec.tasks if x["desc"] == "slots"]  # from the bound call only
    assert t["depth"] == 1 and t["total"] == t["n"] == 3 and t["unit"] == "slot" and t["closed"]
    assert [p["slot"] for p in t["postfix"]] == ["1/3", "2/3", "3/3"]  # the item now running


def _tasks(rec, desc):
    return [x for x in rec.tasks if x["desc"] == desc]


def _all_done(tasks, total):
    return tasks and all(t["total"] == t["n"] == total and t["closed"] for t in tasks)


def _cli_with(rec, monkeypatch):
    """The CLI as a person runs it, with ``rec`` in place of its tqdm bars."""
    monkeypatch.setattr(progress, "TqdmReporter", lambda: rec)


def _collab_argv(model_dir, tmp_path, *extra):
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({**FAST, "v_lr": 1.0, "clamp_norm_factor": 8.0, "mom2_update_weight": 10.0}))
    return ["collab", "run", "--model", str(model_dir), "--hparams", str(hp), "--layers", "1,2", "--corpus", str(CORPUS),
            "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--clients", "2", "--per-client", "2",
            "--form", "layerwise", *extra]


def test_collab_local_engine_shows_rounds_stages_layers_and_each_client(tiny_model_dir, tmp_path, capsys, monkeypatch):
    rec = Recorder()
    _cli_with(rec, monkeypatch)
    argv = _collab_argv(tiny_model_dir, tmp_path, "--engine", "local", "--rounds", "2", "--merge", "collabedit,average")
    assert main([*argv, "--out", str(tmp_path / "o")]) == 0
    (rounds,) = _tasks(rec, "CollabEdit rounds")
    assert rounds["depth"] == 0 and rounds["total"] == rounds["n"] == 4 and rounds["closed"]  # 2 merges × 2 rounds
    assert rounds["postfix"][-1]["merge"] == "average" and rounds["postfix"][-1]["round"] == "2/2"
    assert "edited" in rounds["postfix"][-1] and "efficacy" in rounds["postfix"][-1]
    stages = [x for x in rec.tasks if x["unit"] == "stage"]
    assert [x["desc"] for x in stages] == ["collabedit round 1/2", "collabedit round 2/2", "average round 1/2",
                                           "average round 2/2"]
    assert _all_done(stages, 4) and {x["depth"] for x in stages} == {1}
    assert "merge (layerwise)" in [p["stage"] for p in stages[0]["postfix"]]
    prepare = _tasks(rec, "prepare: clients")
    assert len(prepare) == 4 and _all_done(prepare, 2) and {x["depth"] for x in prepare} == {2}
    assert [p["client"] for p in prepare[0]["postfix"]] == ["c0", "c1"]
    merges = _tasks(rec, "layerwise merge")  # CollabEdit's rounds only; one step per edited layer
    assert len(merges) == 2 and _all_done(merges, 2) and [p["layer"] for p in merges[0]["postfix"]] == [1, 2]
    assert len(_tasks(rec, "layer: clients")) == 4 and _all_done(_tasks(rec, "layer: clients"), 2)
    assert len(_tasks(rec, "evaluate: clients")) == 4 and _all_done(_tasks(rec, "evaluate: clients"), 2)
    assert _all_done(_tasks(rec, "base-model measurement: clients"), 2)
    assert _all_done(_tasks(rec, "global MEMIT reference"), 2)
    # in this process, each client's own target optimisation shows below the client it belongs to
    inside = [x for x in rec.tasks if x["desc"] == "target vectors" and x["depth"] == 3]
    assert inside and all(x["closed"] for x in rec.tasks)
    capsys.readouterr()
    n = len(rec.tasks)
    assert main([*argv, "--out", str(tmp_path / "o2"), "--no-reference", "--json"]) == 0  # --json: no reporter, no bars
    captured = capsys.readouterr()
    assert len(rec.tasks) == n and "%|" not in captured.err, captured.err
    assert len(captured.out.strip().splitlines()) == 1 and json.loads(captured.out)["engine"] == "local"


def test_collab_flower_engine_reports_from_the_server_thread(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The ServerApp runs in Flower's thread, the clients in Ray processes: the server's bars say
    which stage each round is in and how many clients have replied."""
    rec = Recorder()
    _cli_with(rec, monkeypatch)
    argv = _collab_argv(tiny_model_dir, tmp_path, "--rounds", "1", "--merge", "collabedit")
    assert main([*argv, "--out", str(tmp_path / "o")]) == 0
    # after the run, in this process: the reference over the same facts
    assert _all_done(_tasks(rec, "global MEMIT reference"), 1)
    assert _all_done(_tasks(rec, "base-model measurement (reference): clients"), 2)
    assert _all_done(_tasks(rec, "CollabEdit rounds"), 1) and _all_done(_tasks(rec, "collabedit round 1/1"), 4)
    assert _all_done(_tasks(rec, "layerwise merge"), 2)
    for step, times in (("digest", 1), ("prepare", 1), ("layer", 2), ("evaluate", 1)):
        replied = _tasks(rec, f"{step}: clients replied")
        assert len(replied) == times and _all_done(replied, 2), (step, replied)
        assert {x["unit"] for x in replied} == {"client"}
    (layer,) = _tasks(rec, "layerwise merge")
    assert {x["depth"] for x in _tasks(rec, "layer: clients replied")} == {layer["depth"] + 1}
    assert all(x["closed"] for x in rec.tasks)


FED_HP = {"mom2_samples": 40, "mom2_seq_len": 32, "v_num_grad_steps": 10, "context_template_length_params": [[4, 5]],
          "layers": [1, 2], "mom2_update_weight": 10.0, "v_lr": 1.0, "clamp_norm_factor": 8.0}


def _fed_argv(model_dir, tmp_path, *extra):
    hp = tmp_path / "fed_hp.json"
    hp.write_text(json.dumps(FED_HP))
    return ["fed", "run", "--model", str(model_dir), "--hparams", str(hp), "--corpus", str(CORPUS),
            "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--clients", "2", *extra]


def test_fed_run_shows_slots_clients_baseline_and_reference(tiny_model_dir, tmp_path, capsys, monkeypatch):
    rec = Recorder()
    _cli_with(rec, monkeypatch)
    assert main(_fed_argv(tiny_model_dir, tmp_path, "--slots", "2", "--n-per-client", "2", "--tau", "-1",
                          "--baseline", "fedavg", "--out", str(tmp_path / "o"))) == 0
    assert capsys.readouterr().out.startswith("# FedEdit")
    (slots,) = _tasks(rec, "FedEdit slots")
    assert slots["depth"] == 0 and slots["total"] == slots["n"] == 2 and slots["unit"] == "slot"
    assert [p["slot"] for p in slots["postfix"]] == ["1/2", "2/2"]
    for step in ("edit", "reuse", "fedavg"):  # per slot: every client's reply
        replied = _tasks(rec, f"{step}: clients replied")
        assert len(replied) == 2 and _all_done(replied, 2) and {x["depth"] for x in replied} == {1}, step
    assert _all_done(_tasks(rec, "setup: clients replied"), 2)
    assert len(_tasks(rec, "evaluate: clients replied")) == 2  # FedEdit's and the baseline's
    assert _all_done(_tasks(rec, "evaluate: clients replied"), 2)
    assert _all_done(_tasks(rec, "FedAvg baseline slots"), 2)
    (ref,) = _tasks(rec, "centralised MEMIT reference")  # in this process, after the federation
    assert ref["total"] == ref["n"] == 2 and ref["depth"] == 0
    assert any(x["desc"] == "measuring" and x["depth"] == 1 for x in rec.tasks)
    assert all(x["closed"] for x in rec.tasks)


def test_fed_run_json_is_one_object_and_no_bars(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Not ours, not the clients': the Ray workers' model loading draws no bar under --json either."""
    monkeypatch.setattr(progress.TqdmReporter, "DELAY", 0)
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    assert main(_fed_argv(tiny_model_dir, tmp_path, "--slots", "1", "--n-per-client", "1", "--no-reference",
                          "--json", "--out", str(tmp_path / "o"))) == 0
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) == 1 and json.loads(captured.out)["clients"] == 2
    assert "%|" not in captured.err and "clients replied" not in captured.err, captured.err
