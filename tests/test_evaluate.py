import json
from dataclasses import replace

import pytest
import torch

from fedit.data.records import EvalRecord, Probe
from fedit.evaluate.report import write
from fedit.evaluate.runner import EvalConfig, aggregate, evaluate, measure, record_metrics
from fedit.testing import tiny_model

from helpers import DARRIEUX, EIFFEL, FAST, JORDAN, load_script, resources

STRONG = {**FAST, "v_lr": 1.0, "v_num_grad_steps": 25, "clamp_norm_factor": 8.0, "layers": [1, 2],
          "mom2_update_weight": 10.0}


def _records():
    jordan = replace(JORDAN, target_true="basketball")
    darrieux = replace(DARRIEUX, target_true="French")
    return [
        EvalRecord(request=EIFFEL, paraphrases=("Where is the Eiffel Tower? In the city of",),
                   neighborhood=(Probe("The Louvre is located in the city of", "Paris"),),
                   generation_prompts=("The Eiffel Tower is",)),
        EvalRecord(request=jordan, paraphrases=("Michael Jordan is a professional",),
                   neighborhood=(Probe("Larry Bird plays the sport of", "basketball"),),
                   generation_prompts=("Michael Jordan is",)),
        EvalRecord(request=darrieux, paraphrases=("Danielle Darrieux speaks",),
                   neighborhood=(Probe("The mother tongue of Jean Gabin is", "French"),),
                   portability=(Probe("Danielle Darrieux was born in a country whose language is", "English"),)),
    ]


def test_record_metrics_by_hand():
    raw = {"rewrite_new": {0: {"nll_sum": 1.0, "n_tokens": 1, "pred": [5], "answer": [5]}},
           "rewrite_true": {0: {"nll_sum": 2.0, "n_tokens": 1, "pred": [5], "answer": [6]}},
           "para_new": {0: {"nll_sum": 3.0, "n_tokens": 1, "pred": [1], "answer": [5]},
                        1: {"nll_sum": 0.5, "n_tokens": 1, "pred": [5], "answer": [5]}},
           "para_true": {0: {"nll_sum": 1.0, "n_tokens": 1, "pred": [1], "answer": [6]},
                         1: {"nll_sum": 0.5, "n_tokens": 1, "pred": [5], "answer": [6]}},  # a tie
           "nb_answer": {0: {"nll_sum": 0.2, "n_tokens": 2, "pred": [7, 8], "answer": [7, 9]}},
           "nb_new": {0: {"nll_sum": 4.0, "n_tokens": 1, "pred": [7], "answer": [5]}}}
    m = record_metrics(raw, raw, "counterfact")
    assert m["efficacy_success"] == 1.0 and m["efficacy_acc"] == 1.0
    assert m["paraphrase_success"] == 0.0  # one loss, one tie
    assert m["paraphrase_acc"] == 0.5
    assert m["neighborhood_success"] == 1.0 and m["neighborhood_acc"] == 0.5 and m["locality"] == 1.0
    agg = aggregate([m, {**m, "paraphrase_success": 1.0}])
    assert agg["paraphrase_success"] == 0.5
    assert agg["score"] == pytest.approx(3 / (1 / 1.0 + 1 / 0.5 + 1 / 1.0))
    assert agg["reliability"] == agg["efficacy_acc"]


def test_shared_inputs_finds_the_longest_extension():
    from fedit.core.probe import shared_inputs

    inputs = [(1, 2), (1, 2, 3), (1,), (2, 5), (1, 2), (1, 3), (1, 2, 3, 4)]
    runs, where = shared_inputs(inputs)
    assert sorted(runs) == [(1, 2, 3, 4), (1, 3), (2, 5)]  # every other input is a prefix of one of these
    for seq, j in zip(inputs, where):
        assert runs[j][:len(seq)] == seq


def test_teacher_forcing_reads_shared_prefixes_exactly():
    from fedit.core.probe import encode_pairs, probe_inputs, shared_inputs, teacher_forced

    lm = tiny_model("gpt2")
    # one-token and multi-token answers after the same prompts, one answer extending another
    prompts = ["The Eiffel Tower is in", "The Eiffel Tower is in", "The Eiffel Tower is in", "Danielle speaks",
               "Danielle speaks", "The Eiffel Tower is in Rome and"]
    answers = [" Rome", " Paris", " Rome and Paris", " French", " English language", " Paris"]
    shared = teacher_forced(lm, prompts, answers)
    runs, _ = shared_inputs(probe_inputs(encode_pairs(lm.tokenizer, prompts, answers)))
    assert len(runs) == 2  # the four Eiffel pairs read one pass, the two Danielle pairs another
    alone = teacher_forced(lm, prompts, answers, share=False)
    one_by_one = [teacher_forced(lm, [p], [a])[0] for p, a in zip(prompts, answers)]
    for a, b, c in zip(shared, alone, one_by_one):
        assert a["answer"] == b["answer"] == c["answer"] and a["pred"] == b["pred"] == c["pred"]
        assert a["nll_sum"] == pytest.approx(c["nll_sum"], abs=1e-4) and b["nll_sum"] == pytest.approx(c["nll_sum"], abs=1e-4)


def test_end_to_end_eval_on_tiny_model(tiny_cache, tmp_path):
    lm = tiny_model("gpt2")
    records = _records()
    w0 = {n: p.clone() for n, p in lm.model.named_parameters()}
    pre_direct = aggregate([record_metrics(r, None, "counterfact") for r in measure(lm, records)])
    report = evaluate(lm, records, EvalConfig(method="memit", dataset="counterfact", fluency_records=2,
                                              gen_tokens=12), overrides=STRONG, resources=resources(tiny_cache))
    # The model is left as it was; pre-edit numbers are the unedited model's.
    assert all(torch.equal(p, w0[n]) for n, p in lm.model.named_parameters())
    for k, v in pre_direct.items():
        assert report["metrics_pre"][k] == pytest.approx(v)
    post, pre = report["metrics"], report["metrics_pre"]
    for k in ("efficacy_success", "paraphrase_success", "neighborhood_success", "score", "fluency",
              "portability_acc", "locality"):
        assert k in post, k
    assert post["efficacy_magnitude"] > pre["efficacy_magnitude"]
    assert report["n"] == 3 and len(report["generations"]) == 2
    files = write(report, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "report.json").read_text())["method"] == "memit"
    assert "| efficacy_success | success |" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "chart.png").read_bytes()[:4] == b"\x89PNG" and files["chart"]


def test_sequential_and_per_batch_protocols(tiny_cache):
    lm = tiny_model("llama")
    records = _records()
    w0 = {n: p.clone() for n, p in lm.model.named_parameters()}
    for seq in (False, True):
        rep = evaluate(lm, records, EvalConfig(method="rome", dataset="counterfact", batch_size=1, sequential=seq,
                                               fluency_records=0), overrides={k: v for k, v in STRONG.items() if k != "mom2_update_weight"} | {"layers": [1]},
                       resources=resources(tiny_cache))
        assert rep["batch_size"] == 1 and rep["sequential"] is seq and "fluency" not in rep["metrics"]
        assert "edit_diagnostics" not in rep  # ROME has no layer loop
        assert all(torch.equal(p, w0[n]) for n, p in lm.model.named_parameters())


def test_sequential_eval_tracks_every_batch(tmp_path):
    from fedit.data.loaders import load_records

    lm = tiny_model("gpt2")
    records = load_records("counterfact", n=3)
    report = evaluate(lm, records, EvalConfig(method="memit", batch_size=1, sequential=True, fluency_records=1),
                      overrides={**FAST, "layers": [1, 2]}, resources=resources(str(tmp_path / "c")))
    rows = report["per_batch"]
    assert [r["batch"] for r in rows] == [0, 1, 2, 3] and [r["edits"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["metrics"]["efficacy_success"] == report["metrics_pre"]["efficacy_success"]
    assert rows[-1]["metrics"] == {k: v for k, v in report["metrics"].items() if k in rows[-1]["metrics"]}
    assert all("fluency" in r["metrics"] and "neighborhood_success" in r["metrics"] for r in rows)
    files = write(report, tmp_path / "out")
    assert (tmp_path / "out" / "batches.png").exists() and "batches_chart" in files
    md = (tmp_path / "out" / "report.md").read_text()
    assert "After each sequential batch" in md and "Each batch's own records" in md
    # what the layer loop did, batch by batch: the residual at the last layer and each layer's step
    diags = report["edit_diagnostics"]
    assert [d["batch"] for d in diags] == [1, 2, 3] and all(d["layers"] == [1, 2] for d in diags)
    assert all(len(d["residual_norms"]) == 3 and len(d["step_scales"]) == 2 for d in diags)
    assert all(d["residual_norms"][-1] < d["residual_norms"][0] for d in diags)
    assert "Layer loop per batch" in md and "Rejected by backtracking: " in md


def test_sequential_eval_splits_the_edits_by_the_batch_they_were_made_in(tmp_path):
    from fedit.data.loaders import load_records
    from fedit.evaluate.runner import by_origin, retention

    lm = tiny_model("gpt2")
    records = load_records("counterfact", n=3)
    report = evaluate(lm, records, EvalConfig(method="memit", batch_size=2, sequential=True, fluency_records=0),
                      overrides=STRONG, resources=resources(str(tmp_path / "c")))
    rows = report["per_batch"]
    assert [[o["edits"] for o in r["by_origin"]] for r in rows[1:]] == [[2], [2, 1]]
    # batch 1's split is the whole of its row; the last row's split is the final per-record values regrouped
    assert rows[1]["by_origin"][0]["metrics"] == {k: v for k, v in rows[1]["metrics"].items()
                                                 if k in rows[1]["by_origin"][0]["metrics"]}
    per_post = [p["post"] for p in report["per_record"]]
    assert rows[2]["by_origin"] == by_origin(per_post, [2, 1])
    ret = retention(report)
    assert [(r["batch"], r["edits"]) for r in ret] == [(1, 2), (2, 1)]
    assert ret[0]["applied"] == rows[1]["by_origin"][0]["metrics"]
    assert ret[1]["applied"] == ret[1]["final"] == rows[2]["by_origin"][1]["metrics"]  # nothing came after it
    assert ret[0]["final"] == rows[2]["by_origin"][0]["metrics"]
    # a report written before the split existed: batch 1 right after it, every batch at the end
    old = {**report, "per_batch": [{k: v for k, v in r.items() if k != "by_origin"} for r in rows]}
    ret_old = retention(old)
    assert ret_old[0]["applied"] == ret[0]["applied"] and ret_old[1]["applied"] is None
    assert [r["final"] for r in ret_old] == [r["final"] for r in ret]
    # one batch, or batches reverted one by one: nothing to split
    assert retention({**report, "batch_size": 3}) == [] and retention({**report, "sequential": False}) == []


class _Stop(Exception):
    pass


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_sequential_run_resumes_from_its_checkpoint_with_the_same_result(method, tmp_path, capsys):
    from fedit.data.loaders import load_records
    from fedit.evaluate.checkpoint import CheckpointError
    from fedit.evaluate.runner import curve_so_far

    records = load_records("counterfact", n=3)
    cfg = EvalConfig(method=method, batch_size=1, sequential=True, fluency_records=1)
    over = {**FAST, "layers": [1, 2]}
    res = resources(str(tmp_path / "c"))
    ck = tmp_path / "out" / "checkpoint"  # where `fedit eval --sequential --out OUT` keeps it
    whole = evaluate(tiny_model("gpt2"), records, cfg, overrides=over, resources=res)

    seen = []

    def stop_after_two(n):
        seen.append(n)
        if len(seen) == 2:
            raise _Stop
    with pytest.raises(_Stop):
        evaluate(tiny_model("gpt2"), records, cfg, overrides=over, resources=res, progress=stop_after_two,
                 checkpoint_dir=ck)
    # the curve so far can be read (and drawn) while the run is stopped
    so_far = curve_so_far(tmp_path / "out")
    assert so_far["in_progress"] and so_far["batches_done"] == 2 and so_far["method"] == method
    assert [r["edits"] for r in so_far["per_batch"]] == [0, 1, 2]
    for a, b in zip(so_far["per_batch"], whole["per_batch"]):
        assert a["metrics"] == pytest.approx(b["metrics"])
    script = load_script("compare_sequential")
    assert script.main([str(tmp_path / "out"), "--out", str(tmp_path / "seq.png"), "--table",
                        "--retention", str(tmp_path / "ret.png")]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "seq.png").exists() and f"| {method} (2 of 3 batches) | 2 |" in out
    assert (tmp_path / "ret.png").exists() and "Each batch's own records" in out
    assert "| 3 | 1 | — | — | — |" in out  # the third batch: not applied yet
    assert script.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "neither report.json nor checkpoint" in capsys.readouterr().err
    # an existing checkpoint is never overwritten silently
    with pytest.raises(CheckpointError, match="--resume"):
        evaluate(tiny_model("gpt2"), records, cfg, overrides=over, resources=res, checkpoint_dir=ck)
    # nor resumed by another run
    with pytest.raises(CheckpointError, match="another run"):
        evaluate(tiny_model("gpt2"), records, cfg, overrides={**over, "layers": [0, 1]}, resources=res,
                 checkpoint_dir=ck, resume=True)
    lm = tiny_model("gpt2")
    w0 = {n: p.clone() for n, p in lm.model.named_parameters()}
    resumed = evaluate(lm, records, cfg, overrides=over, resources=res, checkpoint_dir=ck, resume=True)
    assert resumed["resumed_after_batch"] == 2
    assert [d["batch"] for d in resumed["edit_diagnostics"]] == [1, 2, 3]  # the first two from the checkpoint
    assert resumed["edit_diagnostics"][:2] == whole["edit_diagnostics"][:2]
    # the cost of each batch, the first two from the checkpoint (the cost curve's data)
    assert [(c["batch"], c["edits"]) for c in resumed["batch_costs"]] == [(1, 1), (2, 1), (3, 1)]
    cost_fields = {"edit_seconds", "target_seconds", "targets_from_cache"}  # recorded, not compared
    assert all(cost_fields <= set(c) and c["peak_rss_mb"] > 0 for c in resumed["batch_costs"])
    if method == "alphaedit":
        assert set(whole["edit_diagnostics"][0]["null_space_rank"]) == {"1", "2"}
    assert [r["edits"] for r in resumed["per_batch"]] == [0, 1, 2, 3]
    for key in ("efficacy_success", "paraphrase_success", "neighborhood_success", "efficacy_acc"):
        assert resumed["metrics"][key] == pytest.approx(whole["metrics"][key]), key
        assert [r["metrics"][key] for r in resumed["per_batch"]] == pytest.approx(
            [r["metrics"][key] for r in whole["per_batch"]])
    assert all(torch.equal(p, w0[n]) for n, p in lm.model.named_parameters())  # reverted to the base model


def test_damaged_checkpoint_is_a_clear_error(tmp_path):
    from fedit.data.loaders import load_records
    from fedit.evaluate.checkpoint import CheckpointError

    records = load_records("counterfact", n=2)
    cfg = EvalConfig(method="memit", batch_size=1, sequential=True, fluency_records=0)
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "progress.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="damaged"):
        evaluate(tiny_model("gpt2"), records, cfg, overrides={**FAST, "layers": [1, 2]},
                 resources=resources(str(tmp_path / "c")), checkpoint_dir=ck, resume=True)
    assert (ck / "progress.json").read_text() == "{not json"  # nothing stored is lost


def test_unedited_measurements_are_reused_only_for_the_same_weights_and_probes(tmp_path, caplog):
    from fedit.data.loaders import load_records

    records = load_records("counterfact", n=2)
    cfg = EvalConfig(method="memit", fluency_records=1)
    over, res, folder = {**FAST, "layers": [1, 2]}, resources(str(tmp_path / "c")), tmp_path / "m"
    first = evaluate(tiny_model("gpt2"), records, cfg, overrides=over, resources=res, pre_cache=folder)
    again = evaluate(tiny_model("gpt2"), records, cfg, overrides=over, resources=res, pre_cache=folder)
    assert first["pre_from_cache"] is False and again["pre_from_cache"] is True
    assert again["metrics_pre"] == first["metrics_pre"] and again["generations"] == first["generations"]
    assert again["metrics"] == pytest.approx(first["metrics"])
    # other probes (one record fewer) or other weights are measured afresh
    assert evaluate(tiny_model("gpt2"), records[:1], cfg, overrides=over, resources=res,
                    pre_cache=folder)["pre_from_cache"] is False
    lm = tiny_model("gpt2")
    with torch.no_grad():
        next(lm.model.parameters()).mul_(1.01)
    assert evaluate(lm, records, cfg, overrides=over, resources=res, pre_cache=folder)["pre_from_cache"] is False
    # a damaged entry is reported, measured again and overwritten
    files = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime)
    assert len(files) == 3
    files[0].write_text('{"raw": [')
    with caplog.at_level("WARNING"):
        rep = evaluate(tiny_model("gpt2"), records, cfg, overrides=over, resources=res, pre_cache=folder)
    assert rep["pre_from_cache"] is False and "damaged" in caplog.text
    assert rep["metrics_pre"] == first["metrics_pre"] and json.loads(files[0].read_text())["raw"]


def test_resume_refuses_a_hyperparameter_file_changed_since_the_checkpoint(tmp_path):
    from fedit.data.loaders import load_records
    from fedit.evaluate.checkpoint import CheckpointError

    records = load_records("counterfact", n=2)
    cfg = EvalConfig(method="memit", batch_size=1, sequential=True, fluency_records=0)
    hp, ck, res = tmp_path / "hp.json", tmp_path / "out" / "checkpoint", resources(str(tmp_path / "c"))
    hp.write_text(json.dumps({**FAST, "layers": [1, 2]}))

    def stop(n):
        raise _Stop
    with pytest.raises(_Stop):
        evaluate(tiny_model("gpt2"), records, cfg, hparams_file=hp, resources=res, progress=stop, checkpoint_dir=ck)
    hp.write_text(json.dumps({**FAST, "layers": [1, 2], "mom2_update_weight": 5.0}))  # the file changes
    with pytest.raises(CheckpointError, match=r"other hyperparameters \(differs in \['mom2_update_weight'\]"):
        evaluate(tiny_model("gpt2"), records, cfg, hparams_file=hp, resources=res, checkpoint_dir=ck, resume=True)
    hp.write_text(json.dumps({**FAST, "layers": [1, 2]}))  # back as it was: the run goes on
    rep = evaluate(tiny_model("gpt2"), records, cfg, hparams_file=hp, resources=res, checkpoint_dir=ck, resume=True)
    assert rep["resumed_after_batch"] == 1


@pytest.mark.parametrize("sequential", [False, True])
def test_a_failure_mid_evaluation_leaves_the_weights_bit_identical(sequential, tiny_cache, tmp_path, monkeypatch):
    import fedit.evaluate.runner as runner

    lm = tiny_model("gpt2")
    w0 = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    real, calls = runner.measure, []
    # measures: the unedited model, then (one at a time) after batch 1; (sequential) after batch 1, after batch 2
    fail_at = [3 if sequential else 2]

    def failing(lm_, recs, **kw):
        calls.append(len(recs))
        if len(calls) == fail_at[0]:
            assert any(not torch.equal(p, w0[n]) for n, p in lm_.model.named_parameters())  # an edit is on
            raise RuntimeError("injected")
        return real(lm_, recs, **kw)

    monkeypatch.setattr(runner, "measure", failing)
    cfg = EvalConfig(method="memit", batch_size=2, sequential=sequential, fluency_records=0)
    run = dict(overrides=STRONG, resources=resources(tiny_cache))
    ck = tmp_path / "checkpoint" if sequential else None
    with pytest.raises(RuntimeError, match="injected"):
        evaluate(lm, _records(), cfg, checkpoint_dir=ck, **run)
    assert all(torch.equal(p, w0[n]) for n, p in lm.model.named_parameters())
    if sequential:  # resumed from the checkpoint of both batches, failing in the final measure
        calls.clear()
        fail_at[0] = 1
        with pytest.raises(RuntimeError, match="injected"):
            evaluate(lm, _records(), cfg, checkpoint_dir=ck, resume=True, **run)
        assert all(torch.equal(p, w0[n]) for n, p in lm.model.named_parameters())


def test_checkpoint_rebuilds_the_state_the_method_registers_and_refuses_another(tmp_path):
    from fedit.evaluate.checkpoint import Checkpoint, CheckpointError
    from fedit.methods import AlphaEditState

    lm = tiny_model("gpt2")
    progress = {"per_batch": [], "batches_done": 1, "raw_pre": [], "gen_pre": {}}
    state = AlphaEditState(kk={1: torch.eye(3)}, edits=2, fingerprint="f")
    Checkpoint(tmp_path / "a", {"method": "alphaedit"}).save(lm.model, set(), state, progress)
    _, got, _ = Checkpoint(tmp_path / "a", {"method": "alphaedit"}).load()
    assert isinstance(got, AlphaEditState) and got.edits == 2 and torch.equal(got.kk[1], torch.eye(3))
    # MEMIT carries no state: a state in its checkpoint is not rebuilt from the class path in the file
    Checkpoint(tmp_path / "m", {"method": "memit"}).save(lm.model, set(), state, progress)
    with pytest.raises(CheckpointError, match="registers no state class"):
        Checkpoint(tmp_path / "m", {"method": "memit"}).load()


def test_zsre_fluency_generates_from_the_edited_prompt(tmp_path):
    """zsRE records carry no generation prompts: fluency is still measured (from the question)."""
    from fedit.data.loaders import load_records

    lm = tiny_model("gpt2")
    records = load_records("zsre", n=2)
    assert not any(r.generation_prompts for r in records)
    report = evaluate(lm, records, EvalConfig(method="memit", dataset="zsre", fluency_records=2, gen_tokens=8),
                      overrides={**FAST, "layers": [1, 2]}, resources=resources(str(tmp_path / "c")))
    assert "fluency" in report["metrics"] and "fluency" in report["metrics_pre"]
    assert [g["prompt"] for g in report["generations"]] == [r.request.filled_prompt for r in records]


def test_sequential_eval_measures_every_kth_batch_and_resumes_with_it(tmp_path):
    from fedit.data.loaders import load_records

    lm = tiny_model("gpt2")
    records = load_records("counterfact", n=5)
    cfg = EvalConfig(method="memit", batch_size=1, sequential=True, fluency_records=0, track_every=2)
    kw = dict(overrides={**FAST, "layers": [1, 2]}, resources=resources(str(tmp_path / "c")))
    report = evaluate(lm, records, cfg, **kw)
    # the unedited row, after batches 2 and 4, and the final measure after batch 5
    assert [r["batch"] for r in report["per_batch"]] == [0, 2, 4, 5]
    assert [r["edits"] for r in report["per_batch"]] == [0, 2, 4, 5]
    assert [c["batch"] for c in report["batch_costs"]] == [1, 2, 3, 4, 5]  # every batch's cost still recorded
    # stopped after 3 batches and resumed: the same curve; a run asking for K=1 refuses the checkpoint
    from fedit.evaluate.checkpoint import CheckpointError

    ck, seen = tmp_path / "out" / "checkpoint", []

    def stop_after_three(n):
        seen.append(n)
        if len(seen) == 3:
            raise _Stop
    with pytest.raises(_Stop):
        evaluate(lm, records, cfg, progress=stop_after_three, checkpoint_dir=ck, **kw)
    with pytest.raises(CheckpointError):
        evaluate(lm, records, replace(cfg, track_every=1), checkpoint_dir=ck, resume=True, **kw)
    resumed = evaluate(lm, records, cfg, checkpoint_dir=ck, resume=True, **kw)
    assert [r["batch"] for r in resumed["per_batch"]] == [0, 2, 4, 5]
    assert resumed["metrics"]["efficacy_success"] == pytest.approx(report["metrics"]["efficacy_success"])
