"""Edits exported as PEFT LoRA adapters: exact factors, same logits as the dense edit, switchable."""

import json

import pytest
import torch

from fedit import WeightDeltas, edit
from fedit.export import RankTooHighError, export_peft, low_rank_factors
from fedit.testing import tiny_model

from helpers import DARRIEUX, EIFFEL, FAST, JORDAN, resources

peft = pytest.importorskip("peft")

PROMPTS = ["The Eiffel Tower is located in the city of", "Michael Jordan plays the sport of", "Paris is a"]


def _logits(lm):
    enc = lm.tokenizer(PROMPTS[:1], return_tensors="pt")
    with torch.no_grad():
        return lm.model(**enc).logits.float()


@pytest.mark.parametrize("arch, method, n_facts", [("gpt2", "rome", 1), ("gpt2", "memit", 3), ("llama", "rome", 1),
                                                   ("llama", "memit", 3), ("gemma3_text", "memit", 2)])
def test_adapter_gives_the_dense_edit_and_switches_off(arch, method, n_facts, tiny_cache, tmp_path):
    lm = tiny_model(arch)
    over = dict(FAST, layers=[1, 2]) if method == "memit" else dict(FAST)
    wd = edit(lm, [EIFFEL, JORDAN, DARRIEUX][:n_facts], method=method, overrides=over,
              resources=resources(tiny_cache), apply=False).deltas
    base = _logits(lm)
    with wd.applied(lm.model):
        dense = _logits(lm)
    assert (dense - base).abs().max() > 1e-3  # the edit changes what the model says

    info = export_peft(wd, tmp_path / "adapter")
    assert set(info.ranks.values()) <= set(range(1, n_facts + 1)) and info.rank <= n_facts
    if method == "rome":
        assert info.rank == 1
    assert info.adapter_numbers < info.dense_numbers
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == info.rank
    assert sorted(cfg["target_modules"]) == sorted(n[: -len(".weight")] for n in wd.deltas)

    pm = peft.PeftModel.from_pretrained(lm.model, str(tmp_path / "adapter"))
    pm.eval()
    enc = lm.tokenizer(PROMPTS[:1], return_tensors="pt")
    with torch.no_grad():
        on = pm(**enc).logits.float()
        with pm.disable_adapter():
            off = pm(**enc).logits.float()
    assert (on - dense).abs().max() <= 1e-4
    assert (off - base).abs().max() <= 1e-6


def test_factors_are_exact_at_the_numerical_rank():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(64, 3, generator=g), torch.randn(3, 128, generator=g)
    d = (u @ v).float()
    B, A = low_rank_factors(d)
    assert B.shape == (64, 3) and A.shape == (3, 128)
    assert torch.allclose(B @ A, d, atol=1e-5, rtol=0)


def test_full_rank_edit_is_refused_with_the_dense_file_named(tmp_path):
    lm = tiny_model("gpt2")
    name = lm.adapter.w_out_param_name(1)
    full = torch.randn(dict(lm.model.named_parameters())[name].shape, generator=torch.Generator().manual_seed(1))
    wd = WeightDeltas(deltas={name: full}, method="ft", model=lm.identity())
    with pytest.raises(RankTooHighError, match="dense"):
        export_peft(wd, tmp_path / "a")
    assert not (tmp_path / "a").exists()  # nothing written
