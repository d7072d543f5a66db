"""The memory-edit mechanism: hooks installed by apply, removed by revert, files of either kind."""

import pytest
import torch

from fedit import WeightDeltas, load_edit
from fedit.errors import DeltaFileError
from fedit.memory import MemoryEdit, output_hook, register_memory, refuse_memory_revert, refuse_saving_memory
from fedit.testing import tiny_model


def _install_shift(model, edit, active):
    """A test memory: adds a stored vector to one module's output."""
    shift = edit.tensors["shift"]
    mod = model.get_submodule(edit.sites[0])
    return [output_hook(mod, active, lambda x, y: y + shift.to(y.dtype) * edit.config["scale"])]


register_memory("test-shift", _install_shift)


def _logits(lm, text="The Eiffel Tower is in"):
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return lm.model(ids).logits


def _edit(lm, value=1.0, scale=1.0):
    d = lm.adapter.d_model
    return MemoryEdit.build(lm, "test-shift", [lm.adapter.w_out_name(1)], {"shift": torch.full((d,), value)},
                            {"scale": scale}, method="test")


def test_apply_revert_leaves_weights_and_logits_exact():
    lm = tiny_model("gpt2")
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    base = _logits(lm)
    mem = _edit(lm)
    h = mem.with_originals(lm.model).apply(lm.model)
    edited = _logits(lm)
    assert not torch.allclose(edited, base)
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())  # weights untouched
    assert h.originals == {}
    h.revert()
    assert torch.equal(_logits(lm), base)
    h.revert()  # twice is harmless
    with mem.applied(lm.model):
        assert torch.equal(_logits(lm), edited)
    assert torch.equal(_logits(lm), base)


def test_newest_memory_at_a_site_acts_and_revert_restores_the_previous():
    lm = tiny_model("gpt2")
    first, second = _edit(lm, 1.0), _edit(lm, -2.0)
    with first.applied(lm.model):
        only_first = _logits(lm)
    h1 = first.apply(lm.model)
    h2 = second.apply(lm.model)
    with second.applied(lm.model):
        pass  # a temporary third application of the same memory
    with_second = _logits(lm)
    h1.revert()  # reverting an older memory leaves the newest acting
    assert torch.equal(_logits(lm), with_second)
    h1 = first.apply(lm.model)
    assert torch.equal(_logits(lm), only_first)
    h1.revert()
    assert torch.equal(_logits(lm), with_second)
    h2.revert()


def test_save_load_round_trip_and_load_edit_dispatch(tmp_path):
    lm = tiny_model("gpt2")
    mem = _edit(lm, 0.5, scale=3.0)
    mem.requests = [{"prompt": "{} is in", "subject": "X", "target_new": "Y"}]
    with mem.applied(lm.model):
        want = _logits(lm)
    back = load_edit(mem.save(tmp_path / "m.safetensors"))
    assert isinstance(back, MemoryEdit) and back.config == {"scale": 3.0} and back.requests == mem.requests
    assert back.metadata()["memory"] == "test-shift" and back.model == lm.identity()
    with back.applied(lm.model):
        assert torch.equal(_logits(lm), want)
    wd = WeightDeltas(deltas={lm.adapter.w_out_param_name(0): torch.zeros_like(lm.adapter.w_out(0).weight)},
                      method="x", model=lm.identity())
    assert isinstance(load_edit(wd.save(tmp_path / "d.safetensors")), WeightDeltas)
    (tmp_path / "bad.safetensors").write_bytes(b"nonsense")
    with pytest.raises(DeltaFileError):
        load_edit(tmp_path / "bad.safetensors")


def test_refusals_name_the_problem():
    lm = tiny_model("gpt2")
    mem = _edit(lm)
    with pytest.raises(DeltaFileError, match="saved model folder"):
        refuse_saving_memory(mem, "out")
    refuse_saving_memory(mem, None)
    with pytest.raises(DeltaFileError, match="nothing to revert"):
        refuse_memory_revert(mem)
    other = tiny_model("llama")
    with pytest.raises(DeltaFileError, match="has no module"):
        mem.apply(other.model)
    unknown = MemoryEdit(kind="nope", sites=[], tensors={}, config={}, method="x", model={})
    with pytest.raises(DeltaFileError, match="does not know"):
        unknown.apply(lm.model)
