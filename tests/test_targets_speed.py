"""Targets that reach their goal leave the batch (``TargetConfig.drop_stopped``) without changing any z."""

import dataclasses

import pytest
import torch

from fedit import hparams_for
from fedit.core.targets import compute_target, compute_targets
from fedit.core.templates import flat
from fedit.testing import tiny_model

from helpers import DARRIEUX, EIFFEL, FAST, JORDAN, resources


def _rows_per_pass(lm, fn):
    """Run ``fn`` and return the number of rows the top block got in each of its calls."""
    seen = []
    top = list(lm.adapter.blocks())[-1]
    handle = top.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[0]),
        with_kwargs=True)
    try:
        out = fn()
    finally:
        handle.remove()
    return out, seen


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
