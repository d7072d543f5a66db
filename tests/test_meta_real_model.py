"""Slow: a MEND editor trained for a few steps on the real default model edits a fact."""

import pytest
import torch

from fedit import EditRequest, edit, load_model
from fedit.core.probe import describe
from fedit.data.loaders import load_records, sample_path
from fedit.methods import hparams_for
from fedit.training import train_editor

pytestmark = pytest.mark.slow

FACT = EditRequest(prompt="The {} is located in the city of", subject="Eiffel Tower", target_new="Rome",
                   target_true="Paris")


def test_mend_trained_briefly_moves_the_fact_and_reverts_exactly(tmp_path, all_threads):
    lm = load_model()
    hp = hparams_for("mend", lm, {"rank": 256, "checkpoint_every": 4, "val_n": 1})
    train_editor(lm, "mend", load_records("zsre", sample_path("zsre"), 20), tmp_path, "zsre", hparams=hp, max_steps=4)
    before = describe(lm, FACT.filled_prompt, "Rome")
    w0 = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    res = edit(lm, [FACT], method="mend", overrides={"archive": str(tmp_path)})
    after = describe(lm, FACT.filled_prompt, "Rome")
    assert set(res.deltas.deltas) == {lm.adapter.w_out_param_name(l) for l in (15, 16, 17)}
    assert after["target_prob"] > 10 * before["target_prob"], (before, after)
    res.applied.revert()
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, w0[n]), n
