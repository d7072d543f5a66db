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
    # the report counts every exchange: the clients' salt agreement once (round 0), then per round
    # one query and one secure sum per layer
    ex = report["traffic"]["exchanges"]
    assert [(e["exchange"], e["round"], e["step"]) for e in ex] == [
        ("keys", 0, None), ("seal", 0, None), ("open", 0, None), ("digest", 1, None), ("prepare", 1, None), ("layer", 1, 0), ("secagg", 1, 0), ("layer", 1, 1), ("secagg", 1, 1),
        ("layer", 1, 2), ("secagg", 1, 2), ("evaluate", 1, None)]
    assert all(e["messages_down"] == e["messages_up"] > 0 and e["bytes_up"] > 0 for e in ex)
    # each layer's query carries the published model with one more merged layer than the last
    down = [e["bytes_down"] for e in ex if e["exchange"] == "layer"]
    assert down[0] < down[1] < down[2]


@pytest.mark.parametrize("arch, pullback", [("gpt2", 0), ("gemma3_text", 30)])
def test_layerwise_rounds_with_running_c1_equal_sequential_layer_by_layer_memit(arch, pullback, tiny_cache):
    """Two rounds with the running covariance C₁. The reference (``reference.sequential_layerwise``):
    centralised MEMIT layer by layer, round after round. Round t edits the model carrying the
    reference's own rounds < t, with z of round t's kept facts optimised on that model; each layer
    l, lowest first on the model as edited so far, is solved with λC₀ + C₁,l + K Kᵀ, where C₁,l is
    the sum of K Kᵀ of the keys every earlier round measured at l. Each round's cumulative merged
    Δ equals it; without C₁ both move elsewhere (C₁ is not negligible here), and equal each other."""
    from dataclasses import replace

    from fedit.collab.reference import resolutions_for, sequential_layerwise
    from fedit.collab.report import attach_reference
    from fedit.collab.driver import LocalExchange
    from fedit.collab.rounds import run_merges

    from collab_local import max_relative, run_local

    lm = tiny_model(arch)
    hp, res = hparams_for("memit", lm, {**OVER, "pullback_steps": pullback}), resources(tiny_cache)
    plan = split_plan(load_records("counterfact", n=12), clients=3, rounds=2, per_client=2)
    cfg = CollabConfig(merges=("collabedit",), form="layerwise", salt=b"s", layerwise_reference=False)
    ref, done, clients, solver = run_local(lm, plan, hp, res, cfg)
    got = done["deltas"]["collabedit"]
    assert [r["rounds"][-1]["edited"] for r in done["runs"].values()] == [6]
    for t in range(2):
        assert max_relative(got[t], ref["sequential_deltas"][t]) < 1e-5, t
    # the report's vs_reference is this comparison, round by round
    report = {"runs": {"collabedit": {"rounds": [{}, {}]}}}
    attach_reference(report, ref, done["deltas"], "layerwise")
    assert all(r["vs_reference"]["relative"] < 1e-5 for r in report["runs"]["collabedit"]["rounds"])
    assert "layerwise_sequential" in ref["report"]["rounds"][1]
    # without C₁: the same round 1, another round 2 (for the run and for the reference alike)
    no_c1 = replace(cfg, c1=False)
    ref0 = sequential_layerwise(lm, clients, resolutions_for(clients, 2, no_c1), clients[0].hp, res, solver.C0, no_c1,
                                lambda s: None)
    got0 = run_merges(LocalExchange(clients, clients[0].model, solver), 2, no_c1, solver)["deltas"]["collabedit"]
    clients[0].model.reset()
    assert max_relative(got0[0], got[0]) < 1e-12
    assert max_relative(ref0[1][0], ref["sequential_deltas"][1]) > 1e-3
    assert max_relative(got0[1], ref0[1][0]) < 1e-5


def _conflict_plan():
    """c0: A, B; c1: A' (A to another target), C, a copy of c0's B; c2: A', D."""
    import dataclasses

    A, B, C, D, E = load_records("counterfact", n=5)
    other = E.request.target_new
    assert other.casefold() != A.request.target_new.casefold()
    A2 = dataclasses.replace(A, request=dataclasses.replace(A.request, target_new=other))
    return {"c0": [[A, B]], "c1": [[A2, C, B]], "c2": [[A2, D]]}, {"A": A, "A'": A2, "B": B, "C": C, "D": D}


@pytest.mark.parametrize("policy, priority, keep, facts", [
    ("reject", None, {"c0": [1], "c1": [1], "c2": [1]}, ["B", "C", "D"]),
    ("first", None, {"c0": [0, 1], "c1": [1], "c2": [1]}, ["A", "B", "C", "D"]),
    ("majority", None, {"c0": [1], "c1": [0, 1], "c2": [1]}, ["A'", "B", "C", "D"]),
    ("priority", ["c2", "c0"], {"c0": [1], "c1": [1], "c2": [0, 1]}, ["A'", "B", "C", "D"]),
])
def test_layerwise_with_overlap_and_conflicts_equals_memit_on_the_kept_facts(policy, priority, keep, facts, tiny_cache):
    """Overlap (c0's B sent again by c1, A' by c1 and c2) and a conflict (A vs A') under each policy:
    the layer-sequential merge equals centralised layer-by-layer MEMIT (``compute_memit``, z
    optimised there from scratch) over the deduplicated facts the policy keeps."""
    import dataclasses

    from fedit.methods.memit import compute_memit

    from collab_local import max_relative, run_local

    lm = tiny_model("gpt2")
    hp, res = hparams_for("memit", lm, OVER), resources(tiny_cache)
    plan, named = _conflict_plan()
    cfg = CollabConfig(merges=("collabedit",), form="layerwise", salt=b"s", conflict_policy=policy, priority=priority)
    _, done, _, _ = run_local(lm, plan, hp, res, cfg, reference=False)
    assert done["resolutions"][0].keep == keep
    assert done["resolutions"][0].n_duplicates == (2 if "A'" in facts else 1)  # B's copy; A''s second if it won
    central = compute_memit(lm, [named[f].request for f in facts], dataclasses.replace(hp, form="layerwise"), res)
    want = {l: lm.adapter.to_param_layout(central.deltas.deltas[lm.adapter.w_out_param_name(l)].double())
            for l in hp.layers}
    assert max_relative(done["deltas"]["collabedit"][0], want) < 1e-5
