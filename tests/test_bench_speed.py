"""benchmarks/bench_speed.py on a tiny model: both paths run on the same records and agree."""

import json

from helpers import CORPUS, FAST, load_script


def test_speed_benchmark_runs_both_paths_and_compares_rates(tiny_model_dir, tmp_path, capsys):
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({**FAST, "layers": [1, 2]}))
    bench = load_script("bench_speed")
    out = tmp_path / "out"
    # a hyperparameter of the new run only: a candidate vocabulary as large as the vocabulary
    # (exact, so the rates below still agree)
    assert bench.main(["--method", "memit", "--n", "3", "--out", str(out), "--json",
                       "--today-set", "speedups=false", "--new-set", "vocab_subset=1000000", "--",
                       "--model", str(tiny_model_dir), "--hparams", str(hp), "--corpus", str(CORPUS),
                       "--cache-dir", str(tmp_path / "cache")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res == json.loads((out / "speed.json").read_text())
    assert res["new_set"] == ["vocab_subset=1000000"] and res["today_set"] == ["speedups=false"]
    # without --today-set, today's path is what the method's file shipped before the speed work
    assert bench.before_sets("memit") == ["speedups=false", "vocab_subset=0", "context_template_length_params=[[10, 5]]"]
    today = json.loads((out / "today" / "report.json").read_text())
    new = json.loads((out / "new" / "report.json").read_text())
    assert today["n"] == new["n"] == 3 and today["targets_from_cache"] == new["targets_from_cache"] == 0
    paths_timed = set(res["seconds_per_fact"])  # both paths reported; their figures are not compared
    assert paths_timed == {"today", "new"} and "speedup" in res
    # float32 targets agree to float noise either way, so the edits measure the same
    assert res["rate_differences"] and all(abs(v) < 1e-6 for v in res["rate_differences"].values())


def test_speed_benchmark_takes_another_baseline_for_methods_without_speedups(tiny_model_dir, tmp_path, capsys):
    """GRACE has no speedups switch: --today-set says what its baseline sets instead."""
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({"layers": [1], "lr": 1.0, "n_iter": 20}))
    bench = load_script("bench_speed")
    out = tmp_path / "out"
    assert bench.main(["--method", "grace", "--n", "2", "--batch-size", "1", "--out", str(out), "--json",
                       "--today-set", "vocab_subset=0", "--new-set", "vocab_subset=1000000", "--",
                       "--model", str(tiny_model_dir), "--hparams", str(hp), "--corpus", str(CORPUS),
                       "--cache-dir", str(tmp_path / "cache")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["today_set"] == ["vocab_subset=0"] and res["method"] == "grace"
    today = json.loads((out / "today" / "report.json").read_text())
    assert today["provenance"]["hparams"]["vocab_subset"] == 0
    assert all(abs(v) < 1e-6 for v in res["rate_differences"].values())  # a covering subset: the same edits


def test_stage_profile_of_an_edit_on_both_paths(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEDIT_CACHE", str(tmp_path / "cache"))
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({**FAST, "layers": [1, 2], "mom2_samples": 8}))
    prof = load_script("profile_edit")
    assert prof.main(["--model", str(tiny_model_dir), "--hparams", str(hp), "--corpus", str(CORPUS), "--n", "2",
                      "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["paths"]) == ["today", "new"]
    for p in out["paths"].values():
        st = p["stages_s"]
        assert st["edit"] > 0 and st["measure"] > 0 and st["targets.upper_forward"] > 0 and st["edit.keys"] > 0
        assert set(prof.STAGES) <= set(st) and st["targets"] <= st["edit"]


def test_workers_benchmark_gives_the_same_targets_both_ways(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEDIT_CACHE", str(tmp_path / "cache"))
    bench = load_script("bench_workers")
    assert bench.main(["--model", str(tiny_model_dir), "--n", "3", "--threads", "1",
                       "--runs", "threads+batch=1,workers+batch=1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["run"], r["batch"], r["workers"]) for r in out["runs"]] == [("threads+batch=1", 1, 1),
                                                                        ("workers+batch=1", 1, 2)]
    assert out["runs"][1]["max_rel_z_diff"] < 1e-4  # the workers optimise the same targets
