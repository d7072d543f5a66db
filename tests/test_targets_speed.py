"""Targets that reach their goal leave the batch (``TargetConfig.drop_stopped``) without changing any z."""

import dataclasses

import pytest
import torch

from fedit import hparams_for
from fedit.core.targets import compute_target, compute_targets
from fedit.core.templates import flat
from fedit.testing import tiny_model

from helpers import DARRIEUX, EIFFEL, FAST, JORDAN, resources


def _top_block_shapes(lm, fn, dim: int):
    """Run ``fn`` and return dimension ``dim`` of what the top block got in each of its calls
    (0: rows, 1: sequence length)."""
    seen = []
    top = list(lm.adapter.blocks())[-1]
    handle = top.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[dim]),
        with_kwargs=True)
    try:
        out = fn()
    finally:
        handle.remove()
    return out, seen


def _rows_per_pass(lm, fn):
    return _top_block_shapes(lm, fn, 0)


@pytest.mark.parametrize("arch, stop, reuse", [("gpt2", 10.5, True), ("gemma3_text", 10.2, True),
                                               ("gemma3_text", 10.2, False)])
def test_stopped_targets_leave_the_batch_and_keep_their_z(arch, stop, reuse, tiny_cache):
    lm = tiny_model(arch)
    # nll_stop chosen so that in this batch one request stops early and another never does.
    hp = hparams_for("memit", lm, {**FAST, "layers": [1, 2], "v_lr": 1.0, "nll_stop": stop})
    templates = flat(resources(tiny_cache).templates(lm, hp.context_template_length_params))
    reqs = [EIFFEL, JORDAN, DARRIEUX]  # different target lengths and prompt lengths
    cfg = dataclasses.replace(hp.target_config(), reuse_lower=reuse)
    assert cfg.drop_stopped  # the default
    old = dataclasses.replace(cfg, drop_stopped=False)

    dropped, rows_new = _rows_per_pass(lm, lambda: compute_targets(lm, reqs, templates, cfg, batch_size=3))
    full, rows_old = _rows_per_pass(lm, lambda: compute_targets(lm, reqs, templates, old, batch_size=3))
    alone = [compute_target(lm, r, templates, cfg) for r in reqs]

    assert len({r.steps for r in alone}) >= 2  # the targets stop at different steps
    assert len(set(rows_old)) == 1  # today's loop runs the whole batch on every pass ...
    assert rows_new[0] == rows_old[0] and rows_new[-1] < rows_old[-1]  # ... the new one sheds stopped rows
    assert sum(rows_new) < sum(rows_old)
    for a, b, c in zip(dropped, full, alone):
        assert a.steps == b.steps == c.steps and a.history == pytest.approx(c.history, rel=1e-4, abs=1e-5)
        tol = dict(rtol=1e-3, atol=1e-4 * float(c.z.norm()))
        assert torch.allclose(a.z, c.z, **tol), (a.z - c.z).norm()
        assert torch.allclose(b.z, c.z, **tol), (b.z - c.z).norm()


def test_joint_site_targets_leave_the_batch_too(tiny_cache):
    lm = tiny_model("gemma3_text")
    hp = hparams_for("pmet", lm, {**FAST, "layers": [1, 2], "v_lr": 1.0, "nll_stop": 10.2})
    templates = flat(resources(tiny_cache).templates(lm, hp.context_template_length_params))
    cfg = hp.target_config()
    assert cfg.joint_site is not None
    reqs = [EIFFEL, JORDAN, DARRIEUX]
    dropped = compute_targets(lm, reqs, templates, cfg, batch_size=3)
    full = compute_targets(lm, reqs, templates, dataclasses.replace(cfg, drop_stopped=False), batch_size=3)
    for a, b in zip(dropped, full):
        assert a.steps == b.steps
        for x, y in ((a.z, b.z), (a.joint_z, b.joint_z)):
            assert torch.allclose(x, y, rtol=1e-3, atol=1e-4 * float(y.norm())), (x - y).norm()


def _seq_lengths(lm, fn):
    return _top_block_shapes(lm, fn, 1)


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "gpt_neox", "llama", "gemma3_text"])
@pytest.mark.parametrize("method", ["memit", "pmet"])
def test_suffix_passes_give_the_targets_of_full_rows(arch, method, tiny_cache):
    """reuse_prefix: the upper blocks see only the columns from δ's on, and z does not change."""
    lm = tiny_model(arch)
    hp = hparams_for(method, lm, {**FAST, "layers": [1, 2]})
    templates = flat(resources(tiny_cache).templates(lm, hp.context_template_length_params))
    cfg = hp.target_config()
    assert cfg.reuse_prefix and cfg.one_projection  # the defaults
    reqs = [EIFFEL, JORDAN, DARRIEUX]
    new, cols_new = _seq_lengths(lm, lambda: compute_targets(lm, reqs, templates, cfg, batch_size=3))
    old_cfg = dataclasses.replace(cfg, reuse_prefix=False, one_projection=False, drop_stopped=False)
    old, cols_old = _seq_lengths(lm, lambda: compute_targets(lm, reqs, templates, old_cfg, batch_size=3))
    # first pass (full rows), the pass recording keys/values (full rows), then suffixes only
    assert cols_new[:2] == cols_old[:2] and max(cols_new[2:]) < cols_old[0] / 2
    for a, b in zip(new, old):
        assert a.steps == b.steps and a.history == pytest.approx(b.history, rel=1e-4, abs=1e-5)
        for x, y in ((a.z, b.z), (a.joint_z, b.joint_z)):
            if y is not None:
                assert torch.allclose(x, y, rtol=1e-3, atol=1e-4 * float(y.norm())), (x - y).norm()


def test_rome_suffix_passes_with_a_single_request(tiny_cache):
    lm = tiny_model("gemma3_text")
    hp = hparams_for("rome", lm, {**FAST, "layers": [1]})
    templates = flat(resources(tiny_cache).templates(lm, hp.context_template_length_params))
    cfg = hp.target_config()
    a = compute_target(lm, JORDAN, templates, cfg)
    b = compute_target(lm, JORDAN, templates, dataclasses.replace(cfg, reuse_prefix=False, one_projection=False))
    assert a.steps == b.steps and torch.allclose(a.z, b.z, rtol=1e-3, atol=1e-4 * float(b.z.norm()))


def test_bfloat16_targets_with_the_unembedding_cast_once(tiny_cache):
    lm = tiny_model("gemma3_text")
    hp = hparams_for("memit", lm, {**FAST, "layers": [1, 2]})
    templates = flat(resources(tiny_cache).templates(lm, hp.context_template_length_params))
    cfg = dataclasses.replace(hp.target_config(), autocast="bfloat16")
    reqs = [EIFFEL, JORDAN]
    before = {k: (v.dtype, v.clone()) for k, v in lm.model.state_dict().items()}
    new = compute_targets(lm, reqs, templates, cfg, batch_size=2)
    for k, v in lm.model.state_dict().items():  # the matrices cast for the loop are back as they were
        assert v.dtype == before[k][0] and torch.equal(v, before[k][1]), k
    old_cfg = dataclasses.replace(cfg, reuse_prefix=False, one_projection=False, cast_once=False)
    old = compute_targets(lm, reqs, templates, old_cfg, batch_size=2)
    for a, b in zip(new, old):
        assert float((a.z - b.z).norm() / b.z.norm()) < 0.03
        assert abs(a.nll_end - b.nll_end) < 0.05 * max(1.0, b.nll_end)


def test_blocks_without_a_cache_argument_run_full_rows():
    """prefix.plan gives up (the caller runs full rows) when a block cannot take prefix keys."""
    from torch import nn

    from fedit.core import prefix

    class Block(nn.Module):
        def forward(self, hidden_states, attention_mask=None):
            return hidden_states * 2

    blocks = [Block(), Block()]
    x = torch.randn(2, 5, 4)
    calls = [((x,), {"attention_mask": None})] * 2
    assert prefix.plan(blocks, calls, 0, x, torch.tensor([2, 3]), torch.tensor([5, 5])) is None


def test_matrices_cast_for_a_loop_are_restored_after_an_error():
    from fedit.core.targets import _matrices_cast

    lm = tiny_model("gemma3_text")
    blocks = list(lm.adapter.blocks())
    w = blocks[1].mlp.down_proj.weight
    ref = w.detach().clone()
    with pytest.raises(RuntimeError):
        with _matrices_cast(blocks[1:], torch.bfloat16):
            assert w.dtype == torch.bfloat16 and blocks[1].input_layernorm.weight.dtype == torch.float32
            raise RuntimeError("interrupted")
    assert w.dtype == torch.float32 and torch.equal(w, ref)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3_text"])
def test_pull_back_on_suffixes_matches_full_prompts(arch):
    from fedit.core.pullback import pull_back

    lm = tiny_model(arch)
    reqs = [EIFFEL, JORDAN, DARRIEUX]
    torch.manual_seed(0)
    want = torch.randn(len(reqs), lm.model.config.hidden_size) * 0.5
    fast = pull_back(lm, reqs, 1, 3, want, steps=8)
    slow = pull_back(lm, reqs, 1, 3, want, steps=8, suffix=False)
    assert fast[1] == pytest.approx(slow[1], rel=1e-4) and fast[2] == pytest.approx(slow[2], rel=1e-3)
    assert torch.allclose(fast[0], slow[0], rtol=1e-3, atol=1e-4 * float(slow[0].norm()))
    assert fast[2] < fast[1]  # it does improve on Δ = want


def test_fused_loss_gives_the_targets_of_the_full_log_softmax(tiny_cache):
    lm = tiny_model("gemma3_text")
    hp = hparams_for("memit", lm, {**FAST, "layers": [1, 2]})
    templates = flat(resources(tiny_cache).templates(lm, hp.context_template_length_params))
    cfg = hp.target_config()
    reqs = [EIFFEL, JORDAN, DARRIEUX]
    a = compute_targets(lm, reqs, templates, dataclasses.replace(cfg, fused_loss=True), batch_size=3)
    b = compute_targets(lm, reqs, templates, cfg, batch_size=3)
    for x, y in zip(a, b):
        assert x.steps == y.steps and x.history == pytest.approx(y.history, rel=1e-4, abs=1e-5)
        assert torch.allclose(x.z, y.z, rtol=1e-3, atol=1e-4 * float(y.z.norm()))


def test_math_attention_kernel_gives_the_same_targets(tiny_cache):
    """math_attention (CPU): PyTorch's math kernel in the loop instead of flash attention; same z."""
    lm = tiny_model("gemma3_text")
    hp = hparams_for("memit", lm, {**FAST, "layers": [1, 2]})
    templates = flat(resources(tiny_cache).templates(lm, hp.context_template_length_params))
    cfg = hp.target_config()
    assert cfg.math_attention  # a speed switch, on by default ...
    assert not hparams_for("memit", lm, {**FAST, "layers": [1, 2], "speedups": False}).target_config().math_attention
    reqs = [EIFFEL, JORDAN, DARRIEUX]
    a = compute_targets(lm, reqs, templates, cfg, batch_size=3)
    b = compute_targets(lm, reqs, templates, dataclasses.replace(cfg, math_attention=False), batch_size=3)
    for x, y in zip(a, b):  # ... that changes no z
        assert x.steps == y.steps and x.history == pytest.approx(y.history, rel=1e-4, abs=1e-5)
        assert torch.allclose(x.z, y.z, rtol=1e-3, atol=1e-4 * float(y.z.norm()))


def test_candidate_vocabulary_normaliser_is_exact_where_it_was_chosen():
    """vocab_subset: candidates' logsumexp joined with the frozen tail is the full logsumexp at
    the logits it was chosen from, and the target tokens are always candidates."""
    from types import SimpleNamespace

    from fedit.core.targets import _Candidates

    torch.manual_seed(0)
    V, N, k = 5000, 6, 2
    logits = torch.randn(N + k, V) * 3
    kl_init = torch.log_softmax(torch.randn(k, V) * 3, -1)
    toks = torch.tensor([4999, 0, 17, 17, 2500, 3])  # ranks anywhere, repeated
    view = SimpleNamespace(kl_init=kl_init, toks=toks)
    c = _Candidates.choose(logits, view, 64, None)
    assert 64 <= len(c.vocab) <= (N + 2 * k) * 64 + N and bool((c.vocab[1:] > c.vocab[:-1]).all())
    assert torch.equal(c.vocab[c.tok_at], toks)
    part = logits[:, c.vocab]
    lse = torch.logaddexp(torch.logsumexp(part, -1), c.tail)
    assert torch.allclose(lse, torch.logsumexp(logits, -1), atol=1e-5)
    assert torch.allclose(c.logp0, kl_init[:, c.vocab])
    every = _Candidates.choose(logits, view, V, None)  # every token a candidate: no tail at all
    assert len(every.vocab) == V and bool(torch.isinf(every.tail).all())


@pytest.mark.parametrize("method", ["memit", "rome"])
def test_candidate_vocabulary_targets(method, tiny_cache):
    """vocab_subset covering the vocabulary gives today's z; a small one a z near it that still
    reaches lower NLL; refresh steps are exact."""
    lm = tiny_model("gemma3_text")
    V = lm.model.config.vocab_size
    hp = hparams_for(method, lm, {**FAST, "layers": [1]})
    templates = flat(resources(tiny_cache).templates(lm, hp.context_template_length_params))
    cfg = hp.target_config()
    assert cfg.vocab_subset == 0  # off unless the hyperparameters say so
    reqs = [EIFFEL, JORDAN] if method == "memit" else [JORDAN]
    full = compute_targets(lm, reqs, templates, cfg, batch_size=2)
    same = compute_targets(lm, reqs, templates, dataclasses.replace(cfg, vocab_subset=V), batch_size=2)
    for x, y in zip(same, full):
        assert x.steps == y.steps and torch.allclose(x.z, y.z, rtol=1e-3, atol=1e-4 * float(y.z.norm()))
    hp_sub = hparams_for(method, lm, {**FAST, "layers": [1], "vocab_subset": 256, "vocab_refresh": 3})
    sub_cfg = hp_sub.target_config()
    assert (sub_cfg.vocab_subset, sub_cfg.vocab_refresh) == (256, 3)
    sub = compute_targets(lm, reqs, templates, sub_cfg, batch_size=2)
    for x, y in zip(sub, full):
        assert x.history[0] == pytest.approx(y.history[0], rel=1e-5)  # step 0 is exact
        assert x.nll_end < x.nll_start
        assert float((x.z - y.z).norm() / (y.z - y.h).norm()) < 0.5  # near today's δ on a random model


def test_candidate_vocabulary_options_are_checked_and_keyed():
    from fedit.core.targets import TargetConfig
    from fedit.errors import HparamsError
    from fedit.target_cache import _config_key

    lm = tiny_model("gpt2")
    with pytest.raises(HparamsError, match="vocab_subset"):
        hparams_for("memit", lm, {"vocab_subset": -1})
    with pytest.raises(HparamsError, match="vocab_refresh"):
        hparams_for("rome", lm, {"vocab_refresh": 0})
    base = TargetConfig(layer=1, site="block")
    # off: the cache key is the one written before the option existed, whatever the refresh
    assert "vocab_subset" not in _config_key(base)
    assert _config_key(base) == _config_key(dataclasses.replace(base, vocab_refresh=9))
    on = _config_key(dataclasses.replace(base, vocab_subset=1024))
    assert on["vocab_subset"] == 1024 and on != _config_key(base)
