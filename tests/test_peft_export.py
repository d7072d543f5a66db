"""Edits exported as PEFT LoRA adapters: exact factors, same logits as the dense edit, switchable."""

import json

import pytest
import torch

from fedit import WeightDeltas, edit
from fedit.export import RankTooHighError, export_peft, low_rank_factors
from fedit.testing import tiny_model

from helpers import CORPUS, DARRIEUX, EIFFEL, FAST, JORDAN, resources, run_json

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


def _edit_argv(model_dir, tmp_path, *extra):
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps(FAST))
    return ["edit", "--method", "rome", "--prompt", "The {} is located in the city of", "--subject", "Eiffel Tower",
            "--target", "Rome", "--layers", "1", "--hparams", str(hp), "--corpus", str(CORPUS),
            "--model", str(model_dir), "--cache-dir", str(tmp_path / "cache"), "--json", *extra]


def test_cli_edit_saves_adapter_and_model_folder_export_converts_a_file(tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from fedit.cli.main import main

    code, out = run_json(capsys, main, _edit_argv(tiny_model_dir, tmp_path, "--save", str(tmp_path / "lora"),
                                                  "--format", "peft", "--out", str(tmp_path / "edited")))
    assert code == 0 and out["format"] == "peft" and out["rank"] == 1 and out["out"] == str(tmp_path / "edited")
    after = out["requests"][0]["after"]["target_prob"]
    # the edited folder holds base + delta, and the adapter on the base gives the same logits
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "edited").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "lora")).eval()
    tok = tiny_model("gpt2").tokenizer
    enc = tok([EIFFEL.filled_prompt], return_tensors="pt")
    with torch.no_grad():
        want, got = edited(**enc).logits, pm(**enc).logits
        with pm.disable_adapter():
            off = pm(**enc).logits
    assert (want - got).abs().max() <= 1e-4 and (want - off).abs().max() > 1e-3

    # a dense file of the same edit exports to the same adapter
    code, out = run_json(capsys, main, _edit_argv(tiny_model_dir, tmp_path, "--save", str(tmp_path / "e.safetensors")))
    assert code == 0 and out["requests"][0]["after"]["target_prob"] == pytest.approx(after, rel=1e-4)
    code, out = run_json(capsys, main, ["export", str(tmp_path / "e.safetensors"), "--peft", str(tmp_path / "lora2"),
                                        "--json"])
    assert code == 0 and out["rank"] == 1 and out["adapter_numbers"] < out["dense_numbers"]
    a = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "lora2" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5)
    info = json.loads((tmp_path / "lora2" / "fedit_edit.json").read_text())
    assert info["method"] == "rome" and info["requests"][0]["subject"] == "Eiffel Tower"


def test_cli_refuses_bad_output_flags_and_falls_back_to_dense(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from fedit.cli import export as export_cli
    from fedit.cli.main import main

    code, out = run_json(capsys, main, _edit_argv(tiny_model_dir, tmp_path, "--format", "peft"))
    assert code == 2 and "--save DIR" in out["error"]
    # a full-rank file is refused by `fedit export` (the dense file is the edit) ...
    lm = tiny_model("gpt2")
    name = lm.adapter.w_out_param_name(1)
    full = torch.randn(dict(lm.model.named_parameters())[name].shape, generator=torch.Generator().manual_seed(2))
    WeightDeltas(deltas={name: full}, method="ft", model=lm.identity()).save(tmp_path / "full.safetensors")
    code, out = run_json(capsys, main, ["export", str(tmp_path / "full.safetensors"), "--peft", str(tmp_path / "x"),
                                        "--json"])
    assert code == 2 and "rank" in out["error"] and "full.safetensors" in out["error"]
    # ... and `fedit edit --format peft` keeps the dense file in the folder and says so
    monkeypatch.setattr(export_cli, "DENSE_FALLBACK", "dense.safetensors")
    import fedit.export as fx

    def too_high(wd, folder, base_model=None):
        raise RankTooHighError("rank 64 is too high.", "keep the dense file.", {"m": 64})

    monkeypatch.setattr(fx, "export_peft", too_high)
    code, out = run_json(capsys, main, _edit_argv(tiny_model_dir, tmp_path, "--save", str(tmp_path / "f"),
                                                  "--format", "peft"))
    assert code == 0 and out["format"] == "safetensors" and "too high" in out["fallback"]
    assert WeightDeltas.load(tmp_path / "f" / "dense.safetensors").method == "rome"


@pytest.mark.slow
def test_default_model_adapter_equals_the_dense_edit(all_threads, tmp_path):
    from fedit import EditRequest, Resources, load_model

    lm = load_model()  # built-in gemma-3-270m, offline
    fact = EditRequest(prompt="The {} is located in the city of", subject="Eiffel Tower", target_new="Rome")
    wd = edit(lm, [fact], method="rome", resources=Resources(), apply=False).deltas
    enc = lm.tokenizer(["The Eiffel Tower is located in the city of"], return_tensors="pt")
    with torch.no_grad():
        base = lm.model(**enc).logits.float()
        with wd.applied(lm.model):
            dense = lm.model(**enc).logits.float()
    info = export_peft(wd, tmp_path / "adapter")
    assert info.rank == 1 and info.adapter_numbers * 100 < info.dense_numbers
    pm = peft.PeftModel.from_pretrained(lm.model, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        on = pm(**enc).logits.float()
        with pm.disable_adapter():
            off = pm(**enc).logits.float()
    print(f"max |adapter - dense| = {(on - dense).abs().max():.2e}, |off - base| = {(off - base).abs().max():.2e}, "
          f"rank {info.rank}, {info.adapter_numbers} vs {info.dense_numbers} numbers")
    assert (on - dense).abs().max() <= 1e-4
    assert (off - base).abs().max() <= 1e-5
    assert lm.tokenizer.decode(on[0, -1].argmax()) == " Rome" != lm.tokenizer.decode(off[0, -1].argmax())
