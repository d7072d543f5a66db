"""ROME, MEMIT, deltas and target optimisation on tiny random models of every architecture."""

import dataclasses

import pytest
import torch

from fedit import EditRequest, RequestError, WeightDeltas, edit, hparams_for, revert_file_edit
from fedit.core import activations
from fedit.core.probe import continuation_logprob
from fedit.core.targets import compute_target
from fedit.core.templates import flat
from fedit.errors import DeltaFileError
from fedit.methods.rome import compute_rome
from fedit.testing import ARCHS, tiny_model

from helpers import DARRIEUX, EIFFEL, FAST, JORDAN, resources


def _weights(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def _same(a, b):
    return all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("arch", ARCHS)
def test_rome_maps_key_to_v_star_exactly(arch, tiny_cache):
    lm = tiny_model(arch)
    res = resources(tiny_cache)
    hp = hparams_for("rome", lm, {**FAST, "layers": [1]})
    out = compute_rome(lm, [EIFFEL], hp, res)
    # v* computed again exactly as ROME does (same templates, same settings) ...
    templates = flat(res.templates(lm, hp.context_template_length_params))
    z = compute_target(lm, EIFFEL, templates, hp.target_config()).z
    out.deltas.apply(lm.model)
    w_name = lm.adapter.w_out_name(1)
    got = activations.at_subject(lm, [EIFFEL], ["{}"], {"o": f"{w_name}:output"})["o"][0, 0]
    # ... is what the edited W_out now outputs for the key of the bare prompt.
    assert torch.allclose(got, z, rtol=1e-4, atol=1e-4 * float(z.norm())), (got - z).norm()


@pytest.mark.parametrize("arch", ARCHS)
def test_memit_residual_shrinks_on_every_layer(arch, tiny_cache):
    lm = tiny_model(arch)
    hp = hparams_for("memit", lm, {**FAST, "layers": [0, 1, 2], "mom2_update_weight": 50.0})
    res = edit(lm, [EIFFEL, JORDAN, DARRIEUX], hparams=hp, resources=resources(tiny_cache), apply=False)
    norms = res.outcome.diagnostics["residual_norms"]
    assert len(norms) == 4
    assert all(b < a for a, b in zip(norms, norms[1:])), norms
    assert norms[-1] < 0.5 * norms[0], norms


@pytest.mark.parametrize("arch, method", [("gpt2", "rome"), ("llama", "rome"), ("gpt2", "memit"), ("llama", "memit"),
                                          ("gemma3_text", "memit")])
def test_edit_raises_target_probability(arch, method, tiny_cache):
    lm = tiny_model(arch)
    over = {**FAST, "v_lr": 1.0, "v_num_grad_steps": 25, "clamp_norm_factor": 8.0}
    if method == "memit":
        over.update(layers=[1, 2], mom2_update_weight=10.0)
    prompt = EIFFEL.filled_prompt
    (before, _), = continuation_logprob(lm, [prompt], ["Rome"])
    edit(lm, [EIFFEL], method=method, overrides=over, resources=resources(tiny_cache))
    (after, _), = continuation_logprob(lm, [prompt], ["Rome"])
    assert after > before + 0.5, (before, after)  # log-probability of " Rome"


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "gemma3_text"])
def test_revert_is_bit_identical_and_file_round_trip(arch, tiny_cache, tmp_path):
    lm = tiny_model(arch)
    w0 = _weights(lm)
    r = edit(lm, [EIFFEL, JORDAN], method="memit", overrides={**FAST, "layers": [1, 2]},
             resources=resources(tiny_cache))
    w1 = _weights(lm)
    assert not _same(w0, w1)
    r.applied.revert()
    assert _same(w0, _weights(lm))

    path = r.deltas.save(tmp_path / "edit.safetensors")
    loaded = WeightDeltas.load(path)
    assert loaded.method == "memit" and loaded.model == lm.identity()
    assert [q["subject"] for q in loaded.requests] == ["Eiffel Tower", "Michael Jordan"]
    assert loaded.hparams["layers"] == [1, 2]
    loaded.apply(lm.model)
    assert _same(w1, _weights(lm))  # applying the file gives the same weights as the edit did
    revert_file_edit(lm.model, loaded)
    assert _same(w0, _weights(lm))


def test_apply_refuses_wrong_base_and_bad_deltas(tiny_cache, tmp_path):
    lm = tiny_model("gpt2")
    r = edit(lm, [EIFFEL], method="rome", overrides=FAST, resources=resources(tiny_cache), apply=False)
    r.deltas.with_originals(lm.model)
    other = tiny_model("gpt2", seed=1)
    w = _weights(other)
    with pytest.raises(DeltaFileError, match="differ from those this edit was computed on"):
        r.deltas.apply(other.model)
    assert _same(w, _weights(other))  # nothing changed
    name = next(iter(r.deltas.deltas))
    bad = dataclasses.replace(r.deltas, deltas={name: torch.full_like(r.deltas.deltas[name], float("nan"))})
    with pytest.raises(DeltaFileError, match="NaN"):
        bad.apply(lm.model)
    wrong = dataclasses.replace(r.deltas, deltas={name: torch.zeros(3, 3)})
    with pytest.raises(DeltaFileError, match="shape"):
        wrong.apply(lm.model)
    with pytest.raises(DeltaFileError, match="cannot be reverted exactly"):
        revert_file_edit(lm.model, dataclasses.replace(r.deltas, originals=None))
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DeltaFileError, match="not a readable safetensors file"):
        WeightDeltas.load(tmp_path / "corrupt.safetensors")


def test_bad_request_raises_before_weights_change(tiny_cache):
    lm = tiny_model("gpt2")
    w0 = _weights(lm)
    with pytest.raises(RequestError):
        edit(lm, [EIFFEL.to_dict(), {"prompt": "{} and {}", "subject": "X", "target_new": "Y"}],
             method="memit", overrides=FAST, resources=resources(tiny_cache))
    with pytest.raises(RequestError, match="tokenises to no ordinary token"):
        edit(lm, [EIFFEL, EditRequest(prompt="{} is", subject="<|endoftext|>", target_new="Y")],
             method="rome", overrides=FAST, resources=resources(tiny_cache))
    assert _same(w0, _weights(lm))


def test_sequential_batches_apply_one_after_another(tiny_cache):
    from fedit import sequential_edit

    lm = tiny_model("llama")
    w0 = _weights(lm)
    results = sequential_edit(lm, [[EIFFEL], [JORDAN]], method="memit", overrides={**FAST, "layers": [1, 2]},
                              resources=resources(tiny_cache))
    # The second batch was computed on the model edited by the first: its originals are edited weights.
    name = lm.adapter.w_out_param_name(1)
    assert not torch.equal(results[1].applied.originals[name], w0[name])
    for r in reversed(results):
        r.applied.revert()
    assert _same(w0, _weights(lm))


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "gemma3_text"])
@pytest.mark.parametrize("site", ["w_out", "block"])
def test_reusing_lower_blocks_gives_the_same_optimisation(arch, site, tiny_cache):
    lm = tiny_model(arch)
    hp = hparams_for("rome", lm, {**FAST, "layers": [2]})
    templates = flat(resources(tiny_cache).templates(lm, hp.context_template_length_params))
    cfg = dataclasses.replace(hp.target_config(), site=site, steps=5)
    fast = compute_target(lm, EIFFEL, templates, cfg)
    slow = compute_target(lm, EIFFEL, templates, dataclasses.replace(cfg, reuse_lower=False))
    assert torch.allclose(torch.tensor(fast.history), torch.tensor(slow.history), rtol=1e-4, atol=1e-5)
    assert torch.allclose(fast.z, slow.z, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch, stop", [("gpt2", 10.5), ("gemma3_text", 10.2)])
def test_batched_targets_equal_one_at_a_time(arch, stop, tiny_cache):
    from fedit.core.targets import compute_targets

    lm = tiny_model(arch)
    # nll_stop chosen so that in this batch one request stops early and another never does.
    hp = hparams_for("memit", lm, {**FAST, "layers": [1, 2], "v_lr": 1.0, "nll_stop": stop})
    templates = flat(resources(tiny_cache).templates(lm, hp.context_template_length_params))
    reqs = [EIFFEL, JORDAN, DARRIEUX]  # different target lengths and prompt lengths
    together = compute_targets(lm, reqs, templates, hp.target_config(), batch_size=3)
    alone = [compute_target(lm, r, templates, hp.target_config()) for r in reqs]
    assert len({r.steps for r in alone}) >= 2
    for a, b in zip(together, alone):
        assert a.steps == b.steps and len(a.history) == len(b.history)
        assert torch.allclose(a.z, b.z, rtol=1e-3, atol=1e-4 * float(b.z.norm())), (a.z - b.z).norm()


def test_backtracking_never_lets_the_residual_grow(tiny_cache):
    lm = tiny_model("gemma3_text")
    hp = hparams_for("memit", lm, {**FAST, "layers": [0, 1, 2], "mom2_update_weight": 1.0, "backtrack_steps": 3,
                                   "pullback_steps": 5})
    out = edit(lm, [EIFFEL, JORDAN, DARRIEUX], hparams=hp, resources=resources(tiny_cache), apply=False).outcome
    norms, scales = out.diagnostics["residual_norms"], out.diagnostics["step_scales"]
    assert len(scales) == 3 and all(s in (0.0, 0.125, 0.25, 0.5, 1.0) for s in scales)
    assert all(b <= a for a, b in zip(norms[:-2], norms[1:-1])), norms  # lower layers: never worse
    assert norms[-1] < norms[0]
