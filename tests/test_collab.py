"""CollabEdit's engine-neutral core: merges, the multi-round state, overlap/conflict rules, a run."""

import dataclasses

import pytest
import torch

from fedit import hparams_for
from fedit.collab import (CollabClient, CollabConfig, CollabState, FactDigest, MergeConfig, MergeError, PublishedModel,
                          PlanError, ProtocolError, average, collabedit, digest, digest_records, fedavg, merge,
                          relation_of, resolve, run_collab, solve, split_plan, task_arithmetic, ties)
from fedit.data.loaders import load_records
from fedit.methods.vectors import LayerSums, compute_memit_base, compute_vectors, layer_sums
from fedit.testing import tiny_model

from helpers import DARRIEUX, EIFFEL, FAST, JORDAN, resources

OVER = {**FAST, "v_lr": 1.0, "v_num_grad_steps": 25, "clamp_norm_factor": 8.0, "layers": [1, 2],
        "mom2_update_weight": 10.0, "form": "base"}
SALT = b"test-salt"


# --- the non-destructive merge -----------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "gemma3_text"])
def test_collabedit_merge_equals_global_base_memit_on_the_union(arch, tiny_cache):
    lm = tiny_model(arch)
    res = resources(tiny_cache)
    hp = hparams_for("memit", lm, OVER)
    parts = [[EIFFEL], [JORDAN, DARRIEUX]]  # two clients
    # Each client measures its own facts on the shared base model and ships only RKᵀ, KKᵀ.
    stats = [layer_sums(compute_vectors(lm, p, hp, res)[0]) for p in parts]
    C0 = res.second_moments(lm, hp.layers, hp.mom2_samples, hp.mom2_seq_len)
    merged = PublishedModel(lm).weight_deltas(collabedit(stats, C0, hp.mom2_update_weight))
    # Global MEMIT (base form) over the union, computed from scratch in one batch.
    ref = compute_memit_base(lm, [EIFFEL, JORDAN, DARRIEUX], hp, res).deltas
    assert set(merged.deltas) == set(ref.deltas)
    for n, d in ref.deltas.items():
        scale = float(d.abs().max())
        assert scale > 0
        assert torch.allclose(merged.deltas[n], d, atol=1e-4 * scale), (n, float((merged.deltas[n] - d).abs().max()) / scale)


def test_collabedit_is_order_free_and_exact_on_statistics():
    g = torch.Generator().manual_seed(1)
    d_in, d_out = 10, 6
    A = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    C0 = {3: A @ A.T / d_in + torch.eye(d_in, dtype=torch.float64)}
    Ks = [torch.randn(n, d_in, generator=g, dtype=torch.float64) for n in (2, 3, 1)]
    Rs = [torch.randn(n, d_out, generator=g, dtype=torch.float64) for n in (2, 3, 1)]
    stats = [{3: LayerSums(R.T @ K, K.T @ K, len(K))} for K, R in zip(Ks, Rs)]
    K, R = torch.cat(Ks), torch.cat(Rs)
    want = R.T @ K @ torch.linalg.inv(2.0 * C0[3] + K.T @ K)
    got = collabedit(stats, C0, 2.0)[3]
    assert torch.allclose(got, want, atol=1e-12)
    assert torch.allclose(collabedit(stats[::-1] + [{}], C0, 2.0)[3], want, atol=1e-12)  # a client without facts
    # The baselines are not the global edit.
    each = [solve(s, C0, 2.0) for s in stats]
    assert not torch.allclose(task_arithmetic(each)[3], want, atol=1e-3)


# --- baselines ---------------------------------------------------------------------------
def test_task_arithmetic_average_and_fedavg_on_hand_made_updates():
    a = {0: torch.tensor([[1.0, 2.0]]), 1: torch.tensor([[0.0]])}
    b = {0: torch.tensor([[3.0, -2.0]]), 1: torch.tensor([[4.0]])}
    assert torch.equal(task_arithmetic([a, b, {}])[0], torch.tensor([[4.0, 0.0]], dtype=torch.float64))
    assert torch.equal(average([a, b, {}])[1], torch.tensor([[2.0]], dtype=torch.float64))  # the empty client is not counted
    assert torch.equal(fedavg([a, b], [1, 3])[0], torch.tensor([[2.5, -1.0]], dtype=torch.float64))
    assert torch.equal(fedavg([a, b], [2, 2])[0], average([a, b])[0])
    with pytest.raises(MergeError, match="different layers"):
        task_arithmetic([a, {0: a[0]}])
    with pytest.raises(MergeError, match="weights"):
        fedavg([a, b], [1])


def test_ties_against_a_hand_computed_case():
    # Three clients, one layer of 5 entries; density 0.4 keeps the top 2 magnitudes per client.
    d1 = {0: torch.tensor([[0.5, -3.0, 0.1, 2.0, 0.0]])}
    d2 = {0: torch.tensor([[4.0, 1.0, -0.2, -1.0, 0.3]])}
    d3 = {0: torch.tensor([[-1.0, -2.0, 0.0, 5.0, 0.1]])}
    # trimmed:  d1 -> [0, -3, 0, 2, 0]; d2 -> [4, 0, 0, 0, 0] (1 and -1 tie below 4? no: top-2 are 4 and |±1|: ties kept)
    #           d2's 2nd largest magnitude is 1.0, so both 1.0 and -1.0 are kept: [4, 1, 0, -1, 0]
    #           d3 -> [0, -2, 0, 5, 0]
    # sum:      [4, -4, 0, 6, 0] -> elected signs [+, -, 0, +, 0]
    # disjoint mean of the entries that agree: [4/1, (-3-2)/2, 0, (2+5)/2, 0] = [4, -2.5, 0, 3.5, 0]
    want = 0.5 * torch.tensor([[4.0, -2.5, 0.0, 3.5, 0.0]], dtype=torch.float64)
    got = ties([d1, d2, d3], density=0.4, scale=0.5)[0]
    assert torch.allclose(got, want), got
    # Density 1 and scale 1 with agreeing signs is the plain mean.
    same = [{0: torch.tensor([[1.0, 2.0]])}, {0: torch.tensor([[3.0, 4.0]])}]
    assert torch.allclose(ties(same, 1.0, 1.0)[0], torch.tensor([[2.0, 3.0]], dtype=torch.float64))
    with pytest.raises(MergeError, match="density"):
        ties(same, 0.0, 1.0)
    with pytest.raises(MergeError, match="unknown merge"):
        MergeConfig("sum")


def test_merge_dispatch_weights_fedavg_by_edit_counts():
    g = torch.Generator().manual_seed(2)
    C0 = {0: torch.eye(4, dtype=torch.float64)}

    def st(n):
        K, R = torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)
        return {0: LayerSums(R.T @ K, K.T @ K, n)}

    stats = [st(1), st(3)]
    each = [solve(s, C0, 1.0) for s in stats]
    assert torch.allclose(merge(MergeConfig("fedavg"), stats, C0, 1.0)[0], (each[0][0] + 3 * each[1][0]) / 4)
    assert torch.allclose(merge(MergeConfig("average"), stats, C0, 1.0)[0], (each[0][0] + each[1][0]) / 2)
    assert torch.allclose(merge(MergeConfig("collabedit"), stats, C0, 1.0)[0], collabedit(stats, C0, 1.0)[0])


# --- multi-round: the running covariance C₁ ---------------------------------------------
def _linear_rounds(c1_weight: float | None, lam: float = 3.0):
    """Two rounds of edits on one linear layer; returns (W after both, W0, C0, Ks, Vs)."""
    g = torch.Generator().manual_seed(3)
    d_in, d_out = 12, 5
    W0 = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    A = torch.randn(d_in, 40, generator=g, dtype=torch.float64)
    C0 = {0: A @ A.T / 40}
    Ks = [torch.randn(4, d_in, generator=g, dtype=torch.float64) for _ in range(2)]
    Vs = [torch.randn(4, d_out, generator=g, dtype=torch.float64) for _ in range(2)]
    st = CollabState()
    for K, V in zip(Ks, Vs):
        W = W0 + st.delta.get(0, 0)
        R = V - K @ W.T  # residual measured on the model that carries the earlier rounds
        stats = {0: LayerSums(R.T @ K, K.T @ K, len(K))}
        delta = solve(stats, C0, lam, st.C1 if c1_weight is not None else None)
        st.apply(delta, stats, {}, c1=c1_weight is not None, c1_weight=c1_weight or 0.0)
    return W0 + st.delta[0], W0, C0, Ks, Vs, lam


def test_multi_round_with_c1_equals_one_global_solve():
    W, W0, C0, Ks, Vs, lam = _linear_rounds(c1_weight=1.0)
    K, V = torch.cat(Ks), torch.cat(Vs)
    R = V - K @ W0.T
    glob = W0 + R.T @ K @ torch.linalg.inv(lam * C0[0] + K.T @ K)
    assert torch.allclose(W, glob, atol=1e-10)
    # DESIGN's literal C₁ += λKKᵀ is a different (stiffer) solve.
    W_lam, *_ = _linear_rounds(c1_weight=lam)
    assert not torch.allclose(W_lam, glob, atol=1e-3)


def test_c1_keeps_round_one_edits_better_than_without():
    W, W0, C0, Ks, Vs, lam = _linear_rounds(c1_weight=1.0)
    W_no, *_ = _linear_rounds(c1_weight=None)
    err = lambda W_: float((Ks[0] @ W_.T - Vs[0]).norm())  # noqa: E731  round-1 facts after round 2
    W1_only = W0 + solve({0: LayerSums((Vs[0] - Ks[0] @ W0.T).T @ Ks[0], Ks[0].T @ Ks[0], 4)}, C0, lam)[0]
    assert err(W) < err(W_no)
    assert err(W) < 1.5 * err(W1_only)  # round 2 barely disturbs round 1 with C₁


# --- overlap and conflict -----------------------------------------------------------------
def _d(key, target):
    return FactDigest(key, f"{key}:{target}")


def test_digests_normalise_and_depend_on_the_salt():
    a = digest("Eiffel  Tower", "id:P276", "Rome", SALT)
    assert a == digest("eiffel tower", "id:P276", " ROME ", SALT)
    paris = digest("Eiffel Tower", "id:P276", "Paris", SALT)
    assert a.key == paris.key and a.target != paris.target
    assert a != digest("Eiffel Tower", "id:P276", "Rome", b"other")
    assert relation_of("The {} is in", None) == "template:the {} is in" and relation_of("x {}", "P19") == "id:P19"
    recs = load_records("counterfact", n=2)
    assert digest_records(recs, SALT)[0].key == digest(recs[0].request.subject, f"id:{recs[0].relation_id}",
                                                       recs[0].request.target_new, SALT).key
    with pytest.raises(ProtocolError, match="salt"):
        digest("a", "b", "c", b"")


def test_overlap_is_counted_once_within_and_across_rounds():
    subs = {"c0": [_d("k1", "x"), _d("k2", "y")], "c1": [_d("k1", "x"), _d("k3", "z")], "c2": [_d("k1", "x")]}
    r = resolve(subs)
    assert r.keep == {"c0": [0, 1], "c1": [1], "c2": []}
    assert r.n_duplicates == 2 and r.conflicts == []
    assert r.duplicates[0]["kept"] == ["c0", 0] and r.duplicates[0]["dropped"] == [["c1", 0], ["c2", 0]]
    # Round 2: a fact applied in round 1 is a duplicate; with another target a rejected conflict.
    r2 = resolve({"c0": [_d("k1", "x")], "c1": [_d("k2", "other"), _d("k4", "w")]},
                 applied={"k1": ("k1:x", 1), "k2": ("k2:y", 1)}, policy="first")
    assert r2.keep == {"c0": [], "c1": [1]}
    assert r2.duplicates[0]["kind"] == "applied in round 1"
    assert r2.conflicts[0]["applied_round"] == 1 and r2.conflicts[0]["rejected"] == [["c1", 0]]


@pytest.mark.parametrize("policy,keep,resolution", [
    ("reject", {"c0": [], "c1": [], "c2": []}, "rejected"),
    ("first", {"c0": [0], "c1": [], "c2": []}, "first: kept the target of c0"),
    ("majority", {"c0": [], "c1": [0], "c2": []}, "majority"),
    ("priority", {"c0": [], "c1": [], "c2": [0]}, "priority: kept the target of c2"),
])
def test_each_conflict_policy(policy, keep, resolution):
    subs = {"c0": [_d("k", "a")], "c1": [_d("k", "b")], "c2": [_d("k", "b")]}
    r = resolve(subs, policy, priority=["c2", "c0"] if policy == "priority" else None)
    assert r.keep == keep
    (c,) = r.conflicts
    assert c["policy"] == policy and c["resolution"].startswith(resolution)
    assert {t["target"] for t in c["targets"]} == {"k:a", "k:b"}
    if policy == "majority":  # c2's copy of the winning target is a duplicate, c0's fact is rejected
        assert r.n_duplicates == 1 and c["rejected"] == [["c0", 0]]


def test_majority_tie_rejects_and_priority_needs_a_list():
    r = resolve({"c0": [_d("k", "a")], "c1": [_d("k", "b")]}, "majority")
    assert r.keep == {"c0": [], "c1": []} and "tie" in r.conflicts[0]["resolution"]
    with pytest.raises(ProtocolError, match="ordered list"):
        resolve({"c0": []}, "priority")
    with pytest.raises(ProtocolError, match="unknown clients"):
        resolve({"c0": []}, "priority", priority=["c9"])
    with pytest.raises(ProtocolError, match="unknown conflict policy"):
        resolve({"c0": []}, "vote")


def test_a_vanished_residual_is_not_edited(tiny_cache):
    lm = tiny_model("gpt2")
    hp = hparams_for("memit", lm, {**OVER, "nll_stop": 1e9})  # the model "already says" every target
    recs = load_records("counterfact", n=2)
    c = CollabClient("c0", PublishedModel(lm), hp, resources(tiny_cache), [recs], SALT)
    p = c.prepare(0, [0, 1])
    assert p.used == [] and p.vanished == [0, 1] and p.stats() == {}


# --- plans and a whole in-process run --------------------------------------------------------
def test_split_plan_places_copies_and_conflicts():
    recs = load_records("counterfact", n=40)
    plan = split_plan(recs, clients=3, rounds=2, per_client=4, overlap=0.25, conflict=0.25)
    assert list(plan) == ["c0", "c1", "c2"] and all(len(v) == 2 and all(len(r) == 4 for r in v) for v in plan.values())
    c0, c1 = plan["c0"][0], plan["c1"][0]
    assert c0[2] is c1[0]  # c0's copy of c1's first fact
    assert c0[3].request.subject == c1[1].request.subject and c0[3].request.target_new != c1[1].request.target_new
    with pytest.raises(PlanError, match="distinct records"):
        split_plan(recs[:5], 3, 2, 4)
    with pytest.raises(PlanError, match="two clients"):
        split_plan(recs, 1, 1, 4, overlap=0.5)


def test_in_process_run_reports_rounds_duplicates_conflicts_and_restores_the_model(tiny_cache):
    lm = tiny_model("gpt2")
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    hp = hparams_for("memit", lm, OVER)
    recs = load_records("counterfact", n=20)
    plan = split_plan(recs, clients=2, rounds=2, per_client=4, overlap=0.25, conflict=0.25)
    cfg = CollabConfig(merges=("collabedit", "ties"), conflict_policy="first", salt=SALT)
    rep = run_collab(lm, plan, hp, resources(tiny_cache), cfg)
    assert all(torch.equal(before[n], p) for n, p in lm.model.named_parameters())  # base weights again
    assert rep["duplicates_total"] == 4 and rep["conflicts_total"] == 4 and rep["rejected_total"] == 4
    conflict = rep["resolution"][0]["conflicts"][0]
    assert conflict["kept_fact"]["client"] == "c0" and conflict["rejected_facts"][0]["client"] == "c1"
    for m in ("collabedit", "ties"):
        rounds = rep["runs"][m]["rounds"]
        assert [r["round"] for r in rounds] == [1, 2]
        assert rounds[0]["edited"] == 4 and rounds[1]["metrics"]["n"] == 8  # 4 distinct facts per round
        # Under "first", c0 (first in client order) keeps every shared or disputed fact.
        assert set(rounds[1]["by_round"]) == {"1", "2"} and set(rounds[1]["by_client"]) == {"c0"}
        c1 = {k: v for k, v in rounds[0]["clients"]["c1"].items() if k != "seconds"}  # timings are not checked
        assert c1 == {"submitted": 4, "kept": 0, "used": 0, "vanished": []}
        assert "efficacy_success" in rounds[1]["by_round"]["1"]
    # Round 1 of CollabEdit is the global base-form MEMIT edit; TIES is not.
    assert rep["runs"]["collabedit"]["rounds"][0]["vs_reference"]["relative"] < 1e-9
    assert rep["runs"]["ties"]["rounds"][0]["vs_reference"]["relative"] > 1e-3
    ref = rep["reference"]["rounds"]
    assert [r["round"] for r in ref] == [1, 2] and ref[1]["edited"] == 8 and "layerwise" in ref[0]
    assert rep["runs"]["collabedit"]["rounds"][0]["metrics"]["efficacy_success"] == ref[0]["base"]["efficacy_success"]


def test_config_refuses_bad_values():
    with pytest.raises(MergeError, match="unknown merge"):
        CollabConfig(merges=("collabedit", "sum"))
    with pytest.raises(ProtocolError, match="policy"):
        CollabConfig(conflict_policy="vote")
    with pytest.raises(MergeError, match="c1_weight"):
        CollabConfig(c1_weight=-1)
    assert "salt" not in CollabConfig().to_dict()
    assert dataclasses.replace(CollabConfig(), merges=["ties"]).merges == ("ties",)
