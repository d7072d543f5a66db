"""MEMIT's base-model form: edit vectors, sufficient statistics, the stats solve."""

import pytest
import torch

from fedit import edit, hparams_for
from fedit.core.probe import continuation_logprob
from fedit.core.solve import memit_delta
from fedit.methods.vectors import (EditVectors, VectorError, compute_vectors, delta_from_sums,
                                   deltas_from_sums, layer_sums)
from fedit.testing import tiny_model

from helpers import DARRIEUX, EIFFEL, FAST, JORDAN, resources

OVER = {**FAST, "v_lr": 1.0, "v_num_grad_steps": 25, "clamp_norm_factor": 8.0, "layers": [1, 2],
        "mom2_update_weight": 10.0, "form": "base"}


def test_stats_solve_equals_memit_delta_and_sums_over_parts():
    g = torch.Generator().manual_seed(0)
    K, R = torch.randn(7, 12, generator=g), torch.randn(7, 5, generator=g)
    A = torch.randn(12, 12, generator=g)
    C = A @ A.T / 12 + torch.eye(12)
    v = EditVectors(torch.randn(7, 5, generator=g), {3: K}, {3: R})
    whole = layer_sums(v)[3]
    parts = layer_sums(v.select([0, 1, 2]))[3] + layer_sums(v.select([3, 4, 5, 6]))[3]
    assert parts.n == 7 and torch.allclose(whole.KK, parts.KK) and torch.allclose(whole.RK, parts.RK)
    ref = memit_delta(K, R, C, 2.0)
    assert torch.allclose(delta_from_sums(whole, C, 2.0), ref, atol=1e-10)
    # A running covariance C1 is the same as solving with extra keys' KKᵀ.
    C1 = torch.randn(12, 3, generator=g)
    C1 = C1 @ C1.T
    assert torch.allclose(delta_from_sums(whole, C, 2.0, C1), memit_delta(K, R, C, 2.0, C1), atol=1e-10)


def test_vectors_refuse_mismatched_parts():
    v = EditVectors(torch.zeros(2, 4), {1: torch.zeros(2, 6)}, {1: torch.zeros(2, 4)}, base_fingerprint="a")
    w = EditVectors(torch.zeros(1, 4), {2: torch.zeros(1, 6)}, {2: torch.zeros(1, 4)}, base_fingerprint="a")
    with pytest.raises(VectorError, match="different layers"):
        EditVectors.cat([v, w])
    with pytest.raises(VectorError, match="different base"):
        EditVectors.cat([v, EditVectors(torch.zeros(1, 4), {1: torch.zeros(1, 6)}, {1: torch.zeros(1, 4)}, base_fingerprint="b")])
    with pytest.raises(VectorError, match="residuals"):
        EditVectors(torch.zeros(2, 4), {1: torch.zeros(2, 6)}, {1: torch.zeros(3, 4)})
    facts = [v.fact_tensors(0), v.fact_tensors(1)]
    back = EditVectors.from_fact_tensors(facts, base_fingerprint="a")
    assert torch.equal(back.keys[1], v.keys[1]) and back.layers == [1]
    del facts[1]["resid.1"]
    with pytest.raises(VectorError, match="fact 1"):
        EditVectors.from_fact_tensors(facts)


@pytest.mark.parametrize("arch", ["gpt2", "gemma3_text"])
def test_base_form_edits_and_equals_solve_from_shipped_vectors(arch, tiny_cache):
    lm = tiny_model(arch)
    res = resources(tiny_cache)
    hp = hparams_for("memit", lm, OVER)
    reqs = [EIFFEL, JORDAN, DARRIEUX]
    prompt = EIFFEL.filled_prompt
    (before, _), = continuation_logprob(lm, [prompt], ["Rome"])
    out = edit(lm, reqs, hparams=hp, resources=res, apply=False)
    vectors = out.outcome.diagnostics["vectors"]
    assert len(vectors) == 3 and vectors.layers == [1, 2]
    # What a receiver does: rebuild from per-fact tensors, no request text, same deltas.
    shipped = EditVectors.from_fact_tensors([vectors.fact_tensors(i) for i in range(3)], base_fingerprint=vectors.base_fingerprint)
    again = deltas_from_sums(lm, layer_sums(shipped), hp, res)
    for n, d in out.deltas.deltas.items():
        assert torch.allclose(again.deltas[n], d, atol=1e-6 * float(d.abs().max()))
    # Given the same zs, vectors are measured identically (no optimisation needed).
    v2, reports, _ = compute_vectors(lm, reqs, hp, res, zs=vectors.zs)
    assert reports == [] and torch.allclose(v2.resids[1], vectors.resids[1], atol=1e-5)
    out.deltas.apply(lm.model)
    (after, _), = continuation_logprob(lm, [prompt], ["Rome"])
    assert after > before + 0.5, (before, after)


@pytest.mark.parametrize("arch", ["gpt2", "gemma3_text"])
def test_layerwise_memit_is_the_stats_solve_of_its_own_vectors(arch, tiny_cache):
    lm = tiny_model(arch)
    res = resources(tiny_cache)
    over = {**OVER, "form": "layerwise"}
    if arch == "gemma3_text":
        over.update(pullback_steps=5, backtrack_steps=2)
    hp = hparams_for("memit", lm, over)
    out = edit(lm, [EIFFEL, JORDAN, DARRIEUX], hparams=hp, resources=res, apply=False)
    vectors = out.outcome.diagnostics["vectors"]
    again = deltas_from_sums(lm, layer_sums(vectors), hp, res)
    for n, d in out.deltas.deltas.items():
        assert torch.allclose(again.deltas[n], d, atol=1e-5 * float(d.abs().max()) + 1e-12), n
