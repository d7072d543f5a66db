"""benchmarks/sweep_memit.py on a tiny model: every point measured once, reruns skip done points."""

import json

from helpers import CORPUS, FAST, load_script


def test_sweep_writes_points_and_resumes(tiny_model_dir, tmp_path, capsys):
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps(FAST))
    common = ["--model", str(tiny_model_dir), "--hparams", str(hp), "--corpus", str(CORPUS), "--cache-dir",
              str(tmp_path / "cache"), "--target-cache", str(tmp_path / "targets"), "--n", "2",
              "--out", str(tmp_path / "out")]
    sweep = load_script("sweep_memit")
    assert sweep.main([*common, "--layers", "1-2,2", "--lambdas", "10,1000"]) == 0
    assert len(list((tmp_path / "cache" / "measurements").glob("*.json"))) == 1  # the unedited model, kept
    doc = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert {(tuple(p["layers"]), p["lambda"]) for p in doc["points"]} == {
        ((1, 2), 10.0), ((1, 2), 1000.0), ((2,), 10.0), ((2,), 1000.0)}
    for p in doc["points"]:
        assert len(p["step_scales"]) == len(p["layers"]) and 0.0 <= p["residual_left"]
        assert 0.0 <= p["metrics"]["score"] <= 1.0
    # the z of layer 2 are optimised once: every later point takes all of them from the cache
    assert sorted(p["targets_from_cache"] for p in doc["points"]) == [0, 2, 2, 2]
    # a smaller λ leaves less of the residual (the same keys, a weaker prior)
    by = {(tuple(p["layers"]), p["lambda"]): p for p in doc["points"]}
    assert by[((2,), 10.0)]["residual_left"] < by[((2,), 1000.0)]["residual_left"]
    table = (tmp_path / "out" / "sweep.md").read_text()
    assert table.count("\n| ") == 5  # header + 4 points
    capsys.readouterr()
    # a rerun with one more λ measures only the new points
    assert sweep.main([*common, "--layers", "2", "--lambdas", "10,100"]) == 0
    saved = (tmp_path / "out" / "sweep.json").read_text()
    doc = json.loads(saved)
    assert len(doc["points"]) == 5 and doc["points"][-1]["lambda"] == 100.0
    # other hyperparameters into the same folder: refused with the reason, nothing lost
    hp.write_text(json.dumps({**FAST, "v_num_grad_steps": 3}))
    assert sweep.main([*common, "--layers", "2", "--lambdas", "10"]) == 2
    assert "hparams" in capsys.readouterr().err
    assert (tmp_path / "out" / "sweep.json").read_text() == saved
    # a damaged sweep file: a clear error, and the file is left as it is
    (tmp_path / "out" / "sweep.json").write_text(saved[:40])
    assert sweep.main([*common, "--layers", "2", "--lambdas", "10"]) == 2
    assert "is not a sweep file" in capsys.readouterr().err
    assert (tmp_path / "out" / "sweep.json").read_text() == saved[:40]


def test_sweep_of_alphaedit_hyperparameters(tiny_model_dir, tmp_path, capsys):
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps(FAST))
    common = ["--model", str(tiny_model_dir), "--hparams", str(hp), "--corpus", str(CORPUS), "--cache-dir",
              str(tmp_path / "cache"), "--target-cache", str(tmp_path / "targets"), "--n", "2",
              "--out", str(tmp_path / "out"), "--method", "alphaedit", "--layers", "1-2"]
    sweep = load_script("sweep_memit")
    # AlphaEdit has no λ; a key it does not have is named before anything is written
    assert sweep.main([*common, "--lambdas", "10"]) == 2 and "--set alpha" in capsys.readouterr().err
    assert sweep.main([*common, "--set", "lambda_=1"]) == 2 and "lambda_" in capsys.readouterr().err
    assert sweep.main([*common, "--set", "alpha"]) == 2 and "KEY=V1,V2" in capsys.readouterr().err
    assert not (tmp_path / "out" / "sweep.json").exists()
    assert sweep.main([*common, "--set", "alpha=100,0.1", "--set", "nullspace_threshold=1e-6,1e6"]) == 0
    doc = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert doc["setup"]["method"] == "alphaedit" and len(doc["points"]) == 4
    by = {(p["set"]["alpha"], p["set"]["nullspace_threshold"]): p for p in doc["points"]}
    assert all(p["lambda"] is None for p in doc["points"])
    # a weaker ridge leaves less of the residual; a threshold above every eigenvalue leaves the whole
    # key space to the update, one below all of them none (no edit: the residual stays)
    assert by[(0.1, 1e6)]["residual_left"] < by[(100, 1e6)]["residual_left"]
    assert by[(0.1, 1e-6)]["residual_left"] > 0.99
    table = (tmp_path / "out" / "sweep.md").read_text()
    assert table.startswith("# alphaedit sweep") and "| alpha | nullspace_threshold |" in table
    # a rerun with one more α measures only the new points
    capsys.readouterr()
    assert sweep.main([*common, "--set", "alpha=100,0.1,1", "--set", "nullspace_threshold=1e6"]) == 0
    assert len(json.loads((tmp_path / "out" / "sweep.json").read_text())["points"]) == 5


def test_sweep_on_a_tuning_split(tiny_model_dir, tmp_path):
    """--skip K sweeps records K…K+n-1: the split is kept in the setup, so a sweep of other records
    is never extended with it, and the table says which records it saw."""
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps(FAST))
    common = ["--model", str(tiny_model_dir), "--hparams", str(hp), "--corpus", str(CORPUS), "--cache-dir",
              str(tmp_path / "cache"), "--target-cache", str(tmp_path / "targets"), "--n", "2",
              "--layers", "2", "--lambdas", "10"]
    sweep = load_script("sweep_memit")
    assert sweep.main([*common, "--skip", "2", "--out", str(tmp_path / "tune")]) == 0
    assert sweep.main([*common, "--out", str(tmp_path / "first")]) == 0
    tune = json.loads((tmp_path / "tune" / "sweep.json").read_text())
    first = json.loads((tmp_path / "first" / "sweep.json").read_text())
    assert tune["setup"]["skip"] == 2 and "skip" not in first["setup"]
    # other records: none of the tuning split's targets serve the first records
    assert first["points"][0]["targets_from_cache"] == 0
    assert "records 2–3" in (tmp_path / "tune" / "sweep.md").read_text()
    assert sweep.main([*common, "--out", str(tmp_path / "tune")]) == 2  # no --skip: another setup


def test_sweep_of_rome_edits_each_record_alone(tiny_model_dir, tmp_path, capsys):
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps(FAST))
    common = ["--model", str(tiny_model_dir), "--hparams", str(hp), "--corpus", str(CORPUS), "--cache-dir",
              str(tmp_path / "cache"), "--target-cache", str(tmp_path / "targets"), "--n", "2",
              "--out", str(tmp_path / "out"), "--method", "rome"]
    sweep = load_script("sweep_memit")
    # no λ, one layer per point: refused before anything is written
    assert sweep.main([*common, "--layers", "1", "--lambdas", "10"]) == 2 and "one layer" in capsys.readouterr().err
    assert sweep.main([*common, "--layers", "1-2"]) == 2
    assert not (tmp_path / "out" / "sweep.json").exists()
    assert sweep.main([*common, "--layers", "1,2", "--set", "kl_factor=0.0625,1"]) == 0
    doc = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert doc["setup"]["method"] == "rome" and len(doc["points"]) == 4
    for p in doc["points"]:
        assert p["lambda"] is None and len(p["layers"]) == 1 and 0.0 <= p["metrics"]["score"] <= 1.0
    # one v* per record and point: none of a point's targets came from another point's cache
    # (layer or KL weight differ), but a rerun of a point would take both
    assert all(p["targets_from_cache"] == 0 for p in doc["points"])
    assert (tmp_path / "out" / "sweep.md").read_text().startswith("# rome sweep") and \
        "each record edited alone" in (tmp_path / "out" / "sweep.md").read_text()
