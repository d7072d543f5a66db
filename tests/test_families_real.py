"""Slow: GRACE on the real default model (Gemma 3 270M) makes it say the new target, and only there."""

import pytest
import torch

from fedit import EditRequest, Resources, edit, load_model
from fedit.core.probe import describe

pytestmark = pytest.mark.slow

FACT = EditRequest(prompt="The {} is located in the city of", subject="Eiffel Tower", target_new="Rome",
                   target_true="Paris")
UNRELATED = ("The capital of Japan is", "Tokyo")


def test_grace_makes_the_model_say_the_new_target(all_threads):
    lm = load_model()  # built-in gemma-3-270m, offline
    assert describe(lm, FACT.filled_prompt, "Rome")["top_token"] == " Paris"
    w0 = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    res = edit(lm, [FACT], method="grace", resources=Resources())
    assert describe(lm, FACT.filled_prompt, "Rome")["top_token"] == " Rome"
    assert describe(lm, *UNRELATED)["top_token"] == " Tokyo"
    ids = lm.tokenizer(FACT.filled_prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert lm.tokenizer.decode(out[0, ids.shape[1]:]).strip().startswith("Rome")
    assert all(torch.equal(p, w0[n]) for n, p in lm.model.named_parameters())
    res.applied.revert()
    assert describe(lm, FACT.filled_prompt, "Rome")["top_token"] == " Paris"
