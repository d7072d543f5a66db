"""Larger-model loading: --dtype (half precision, auto) and --device-map auto, on tiny models."""

import json

import pytest
import torch

from fedit import WeightDeltas, edit, load_model, revert_file_edit
from fedit.cli.main import main
from fedit.core.probe import continuation_logprob
from fedit.errors import FeditError

from helpers import CORPUS, EIFFEL, FAST, resources, run_json


@pytest.fixture(scope="module")
def llama_dir(tiny_model_folder):
    return tiny_model_folder("llama")


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_bfloat16_edit_raises_the_target_and_stores_bfloat16_deltas(llama_dir, method, tiny_cache, tmp_path):
    lm = load_model(str(llama_dir), dtype="bfloat16", device="cpu")
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    over = {**FAST, "v_lr": 1.0, "v_num_grad_steps": 25, "clamp_norm_factor": 8.0}
    if method == "memit":
        over.update(layers=[1, 2], mom2_update_weight=10.0)
    (before, _), = continuation_logprob(lm, [EIFFEL.filled_prompt], ["Rome"])
    res = edit(lm, [EIFFEL], method=method, overrides=over, resources=resources(tiny_cache))
    (after, _), = continuation_logprob(lm, [EIFFEL.filled_prompt], ["Rome"])
    assert after > before + 0.5, (before, after)
    assert {d.dtype for d in res.deltas.deltas.values()} == {torch.bfloat16}
    # reverts bit-identically; the saved file keeps the dtype and round-trips on the bfloat16 model
    res.applied.revert()
    keep = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    f = WeightDeltas.load(res.deltas.with_originals(lm.model).save(tmp_path / "e.safetensors"))
    assert {d.dtype for d in f.deltas.values()} == {torch.bfloat16}
    f.apply(lm.model)
    revert_file_edit(lm.model, f)
    assert all(torch.equal(p, keep[n]) for n, p in lm.model.named_parameters())


def test_dtype_auto_keeps_the_checkpoint_dtype(llama_dir, tmp_path):
    assert next(load_model(str(llama_dir), dtype="auto", device="cpu").model.parameters()).dtype == torch.float32
    half = tmp_path / "half"
    lm = load_model(str(llama_dir), dtype="bfloat16", device="cpu")
    lm.model.save_pretrained(half)
    lm.tokenizer.save_pretrained(half)
    assert next(load_model(str(half), dtype="auto", device="cpu").model.parameters()).dtype == torch.bfloat16
    with pytest.raises(FeditError, match="unknown dtype"):
        load_model(str(llama_dir), dtype="float8")


def test_device_map_auto_on_cpu_edits_and_refuses_a_second_placement(llama_dir, tiny_cache):
    lm = load_model(str(llama_dir), device_map="auto", dtype="bfloat16")
    # accelerate places every layer on the only device there is (a map only where several are)
    assert lm.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    (before, _), = continuation_logprob(lm, [EIFFEL.filled_prompt], ["Rome"])
    over = {**FAST, "v_lr": 1.0, "v_num_grad_steps": 25, "clamp_norm_factor": 8.0}
    r = edit(lm, [EIFFEL], method="rome", overrides=over, resources=resources(tiny_cache))
    (after, _), = continuation_logprob(lm, [EIFFEL.filled_prompt], ["Rome"])
    assert after > before + 0.5
    r.applied.revert()
    with pytest.raises(FeditError, match="both place the model"):
        load_model(str(llama_dir), device="cpu", device_map="auto")
    with pytest.raises(FeditError, match="device-map"):
        load_model(str(llama_dir), device_map="everywhere")


def test_cli_edit_in_bfloat16_with_device_map(llama_dir, tmp_path, capsys):
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({**FAST, "v_lr": 1.0, "v_num_grad_steps": 25, "clamp_norm_factor": 8.0}))
    code, out = run_json(capsys, main, [
        "edit", "--method", "rome", "--prompt", "The {} is located in the city of", "--subject", "Eiffel Tower",
        "--target", "Rome", "--layers", "1", "--hparams", str(hp), "--corpus", str(CORPUS), "--model", str(llama_dir),
        "--cache-dir", str(tmp_path / "cache"), "--dtype", "bfloat16", "--device-map", "auto",
        "--save", str(tmp_path / "e.safetensors"), "--json"])
    assert code == 0
    (r,) = out["requests"]
    assert r["after"]["target_prob"] > r["before"]["target_prob"]
    wd = WeightDeltas.load(tmp_path / "e.safetensors")
    assert {d.dtype for d in wd.deltas.values()} == {torch.bfloat16}
    lm = load_model(str(llama_dir), dtype="bfloat16", device="cpu")
    keep = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    wd.apply(lm.model)
    revert_file_edit(lm.model, wd)
    assert all(torch.equal(p, keep[n]) for n, p in lm.model.named_parameters())
