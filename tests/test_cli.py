import json

import pytest
import torch

from fedit.cli.main import main

from helpers import run_json, CORPUS, FAST


@pytest.fixture
def model_dir(tiny_model_dir):
    return tiny_model_dir


def _run(capsys, argv):
    return run_json(capsys, main, argv)


def test_edit_save_apply_revert(model_dir, tmp_path, capsys):
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps(FAST))
    common = ["--model", str(model_dir), "--cache-dir", str(tmp_path / "cache"), "--json"]
    code, out = _run(capsys, ["edit", "--method", "rome", "--prompt", "The {} is located in the city of",
                              "--subject", "Eiffel Tower", "--target", "Rome", "--layers", "1", "--hparams", str(hp),
                              "--corpus", str(CORPUS), "--save", str(tmp_path / "e.safetensors"), *common])
    assert code == 0
    assert set(out) >= {"method", "model", "requests"} and out["method"] == "rome"
    (r,) = out["requests"]
    assert set(r) == {"prompt", "subject", "target", "before", "after"}
    assert set(r["before"]) == {"target_prob", "top_token"}
    assert r["after"]["target_prob"] != r["before"]["target_prob"]

    code, out = _run(capsys, ["apply", str(tmp_path / "e.safetensors"), "--out", str(tmp_path / "edited"), *common])
    assert code == 0 and out["requests"][0]["after"]["target_prob"] == pytest.approx(r["after"]["target_prob"], rel=1e-4)
    code, out = _run(capsys, ["revert", str(tmp_path / "e.safetensors"), "--model", str(tmp_path / "edited"),
                              "--out", str(tmp_path / "back"), "--cache-dir", str(tmp_path / "cache"), "--json"])
    assert code == 0
    from safetensors.torch import load_file
    a, b = load_file(str(model_dir / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical after revert


def test_memit_requests_file_and_stats(model_dir, tmp_path, capsys):
    reqs = tmp_path / "r.jsonl"
    reqs.write_text('{"prompt": "{} plays the sport of", "subject": "Michael Jordan", "target_new": "soccer"}\n'
                    '{"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"}\n')
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps(FAST))
    code, out = _run(capsys, ["edit", "--method", "memit", "--requests", str(reqs), "--layers", "1,2", "--hparams",
                              str(hp), "--corpus", str(CORPUS), "--model", str(model_dir), "--cache-dir",
                              str(tmp_path / "c"), "--json"])
    assert code == 0 and len(out["requests"]) == 2
    code, out = _run(capsys, ["stats", "--model", str(model_dir), "--layers", "0,3", "--corpus", str(CORPUS),
                              "--samples", "6", "--seq-len", "16", "--cache-dir", str(tmp_path / "c"), "--json"])
    assert code == 0 and out["layers"] == [0, 3] and set(out["trace"]) == {"0", "3"}


def test_bad_input_exits_2_with_fix(model_dir, tmp_path, capsys):
    code, out = _run(capsys, ["edit", "--prompt", "The tower is in", "--subject", "Eiffel Tower", "--target", "Rome",
                              "--model", str(model_dir), "--json"])
    assert code == 2 and "occurs 0 times" in out["error"] and "Fix:" in out["error"]
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    code, out = _run(capsys, ["apply", str(tmp_path / "bad.safetensors"), "--model", str(model_dir), "--json"])
    assert code == 2 and "not a readable safetensors file" in out["error"]


def test_eval_command_writes_reports(model_dir, tmp_path, capsys):
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({**FAST, "layers": [1, 2]}))
    code, out = _run(capsys, ["eval", "--method", "memit", "--dataset", "counterfact", "--n", "3", "--fluency-n", "1",
                              "--hparams", str(hp), "--corpus", str(CORPUS), "--model", str(model_dir),
                              "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "rep"), "--json"])
    assert code == 0
    assert out["n"] == 3 and out["method"] == "memit" and out["dataset"] == "counterfact"
    for k in ("efficacy_success", "paraphrase_success", "neighborhood_success", "score", "fluency"):
        assert k in out["metrics"] and k in out["metrics_pre"]
    assert (tmp_path / "rep" / "report.md").exists() and (tmp_path / "rep" / "chart.png").exists()
    code, out = _run(capsys, ["eval", "--method", "memit", "--dataset", "zsre", "--n", "2", "--hparams", str(hp),
                              "--corpus", str(CORPUS), "--model", str(model_dir), "--cache-dir", str(tmp_path / "c"),
                              "--out", str(tmp_path / "rep2"), "--json"])
    assert code == 0 and {"efficacy_acc", "paraphrase_acc", "specificity_acc"} <= set(out["metrics"])
    code, out = _run(capsys, ["eval", "--method", "memit", "--dataset", "nope", "--model", str(model_dir),
                              "--out", str(tmp_path / "x"), "--json"])
    assert code == 2 and "nope" in out["error"]


def test_trace_prompt_json_and_png(model_dir, tmp_path, capsys):
    png = tmp_path / "trace.png"
    code, out = _run(capsys, ["trace", "--prompt", "The {} is located in the city of", "--subject", "Eiffel Tower",
                              "--samples", "3", "--window", "2", "--edit-layers", "2", "--out", str(png),
                              "--model", str(model_dir), "--cache-dir", str(tmp_path / "c"), "--json"])
    assert code == 0 and out["mode"] == "prompt" and out["kinds"] == ["hidden", "mlp", "attn"]
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out["out"] == str(png)
    m = out["maps"]["mlp"]
    assert len(m["scores"]) == len(m["tokens"]) and len(m["scores"][0]) == 4  # tokens × layers
    assert m["subject_range"] == [1, 5] and m["window"] == 2 and out["maps"]["hidden"]["window"] is None
    assert set(out["peak"]) == {"hidden", "mlp", "attn"} and {"token", "layer", "effect"} <= set(out["peak"]["mlp"])
    assert len(out["recommendation"]["memit_layers"]) == 2 and out["noise_level"] > 0
    code, out = _run(capsys, ["trace", "--prompt", "The {} is located in", "--subject", "Eiffel Tower", "--kind",
                              "hidden", "--answer", "Paris", "--out", str(png), "--model", str(model_dir),
                              "--cache-dir", str(tmp_path / "c"), "--json"])
    assert code == 0 and list(out["maps"]) == ["hidden"] and out["maps"]["hidden"]["answer"] == " Paris"
    assert "recommendation" not in out


def test_trace_dataset_averages(model_dir, tmp_path, capsys):
    png = tmp_path / "avg.png"
    code, out = _run(capsys, ["trace", "--dataset", "known_1000", "--n", "2", "--include-unknown", "--kind", "mlp",
                              "--samples", "2", "--out", str(png), "--model", str(model_dir),
                              "--cache-dir", str(tmp_path / "c"), "--json"])
    assert code == 0 and out["mode"] == "dataset" and out["n"] == 2 and png.exists()
    m = out["maps"]["mlp"]
    assert m["rows"][2] == "last subject token" and len(m["scores"]) == 6 and m["n"] == 2
    assert "rome_layer" in out["recommendation"]
    code, out = _run(capsys, ["trace", "--subject", "X", "--out", str(png), "--model", str(model_dir), "--json"])
    assert code == 2 and "--prompt" in out["error"]


@pytest.mark.parametrize("method", ["pmet", "alphaedit"])
def test_edit_with_pmet_and_alphaedit(model_dir, tmp_path, capsys, method):
    reqs = tmp_path / "r.jsonl"
    reqs.write_text('{"prompt": "{} plays the sport of", "subject": "Michael Jordan", "target_new": "soccer"}\n'
                    '{"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"}\n')
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({**FAST, "nullspace_threshold": 0.05, "alpha": 0.01} if method == "alphaedit" else FAST))
    code, out = _run(capsys, ["edit", "--method", method, "--requests", str(reqs), "--sequential", "1", "--layers", "1,2",
                              "--hparams", str(hp), "--corpus", str(CORPUS), "--model", str(model_dir),
                              "--save", str(tmp_path / "e.safetensors"), "--cache-dir", str(tmp_path / "c"), "--json"])
    assert code == 0 and out["method"] == method and len(out["requests"]) == 2
    from fedit.deltas import WeightDeltas

    assert WeightDeltas.load(tmp_path / "e.safetensors").method == method


def test_eval_reuses_cached_targets_and_sequential_run_leaves_no_checkpoint(model_dir, tmp_path, capsys):
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({**FAST, "layers": [1, 2]}))
    common = ["--method", "memit", "--dataset", "counterfact", "--n", "2", "--fluency-n", "0", "--hparams", str(hp),
              "--corpus", str(CORPUS), "--model", str(model_dir), "--cache-dir", str(tmp_path / "c"),
              "--target-precision", "bfloat16", "--target-cache", str(tmp_path / "targets"), "--json"]
    for i, expect in enumerate([0, 2]):
        code, out = _run(capsys, ["eval", *common, "--out", str(tmp_path / f"r{i}")])
        assert code == 0
        rep = json.loads((tmp_path / f"r{i}" / "report.json").read_text())
        assert rep["targets_from_cache"] == expect and rep["pre_from_cache"] is (i == 1)  # <cache>/measurements
    code, out = _run(capsys, ["eval", *common, "--batch-size", "1", "--sequential", "--out", str(tmp_path / "s")])
    assert code == 0 and [r["edits"] for r in out["per_batch"]] == [0, 1, 2]
    assert not (tmp_path / "s" / "checkpoint").exists()  # a finished run removes its checkpoint
