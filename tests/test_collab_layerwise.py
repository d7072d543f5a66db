"""Layer-sequential CollabEdit (``form="layerwise"``): the merged edit equals centralised
layer-by-layer MEMIT over the union of the clients' facts, with the same z, moments and hparams."""

import pytest
import torch

from fedit import hparams_for
from fedit.collab import CollabConfig, MergeError, run_collab, split_plan
from fedit.data.loaders import load_records
from fedit.testing import tiny_model

from helpers import FAST, resources

OVER = {**FAST, "v_lr": 1.0, "v_num_grad_steps": 15, "clamp_norm_factor": 8.0, "layers": [0, 1, 2],
        "mom2_update_weight": 10.0, "pullback_steps": 0, "backtrack_steps": 0}


@pytest.mark.parametrize("arch, pullback", [("gpt2", 0), ("gemma3_text", 30)])
def test_layerwise_round_equals_centralised_layer_by_layer_memit(arch, pullback, tiny_cache):
    lm = tiny_model(arch)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    hp = hparams_for("memit", lm, {**OVER, "pullback_steps": pullback})
    plan = split_plan(load_records("counterfact", n=12), clients=3, rounds=1, per_client=2)
    cfg = CollabConfig(merges=("collabedit",), form="layerwise", salt=b"s", layerwise_reference=True)
    rep = run_collab(lm, plan, hp, resources(tiny_cache), cfg)
    assert all(torch.equal(before[n], p) for n, p in lm.model.named_parameters())
    r1 = rep["runs"]["collabedit"]["rounds"][0]
    assert r1["edited"] == 6
    # vs_reference compares with the global MEMIT of the chosen form: layer by layer, same z
    assert r1["vs_reference"]["relative"] < 1e-5, r1["vs_reference"]
    # ...which is not the base form: the two forms differ on these models
    assert rep["reference"]["rounds"][0]["layerwise_vs_base"]["relative"] > 1e-3
    assert r1["metrics"]["efficacy_success"] == rep["reference"]["rounds"][0]["layerwise"]["efficacy_success"]


def test_base_form_run_is_unchanged_by_the_option(tiny_cache):
    lm = tiny_model("gpt2")
    hp = hparams_for("memit", lm, OVER)
    plan = split_plan(load_records("counterfact", n=8), clients=2, rounds=1, per_client=2)
    rep = run_collab(lm, plan, hp, resources(tiny_cache),
                     CollabConfig(merges=("collabedit",), salt=b"s", layerwise_reference=False))
    assert rep["config"]["form"] == "base"
    assert rep["runs"]["collabedit"]["rounds"][0]["vs_reference"]["relative"] < 1e-9
    with pytest.raises(MergeError, match="form"):
        CollabConfig(form="sequential")


def test_layerwise_through_flower_with_secagg_equals_the_reference(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """`fedit collab run --form layerwise --secagg`: one secure sum per edited layer, and the merged
    edit is centralised layer-by-layer MEMIT computed in this process (z optimised twice)."""
    import json

    from fedit.cli.main import main

    from helpers import CORPUS, run_json

    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({k: v for k, v in OVER.items() if k != "layers"}))
    code, out = run_json(capsys, main, [
        "collab", "run", "--model", str(tiny_model_dir), "--hparams", str(hp), "--layers", "0,1,2",
        "--corpus", str(CORPUS), "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--json",
        "--clients", "2", "--rounds", "1", "--per-client", "2", "--form", "layerwise", "--secagg",
        "--out", str(tmp_path / "o")])
    assert code == 0, out
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["config"]["form"] == "layerwise"
    assert [(s["round"], s["layer"], s["clients"]) for s in report["secure_aggregation"]] == [(1, 0, 2), (1, 1, 2),
                                                                                               (1, 2, 2)]
    assert out["vs_reference"]["collabedit"]["relative"] < 1e-4
