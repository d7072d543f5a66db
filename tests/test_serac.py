"""SERAC on a tiny random model: the scope classifier, routing, exact revert, save/load."""

import json

import pytest
import torch

from fedit.api import edit
from fedit.cli.main import main
from fedit.data.loaders import load_records, sample_path
from fedit.methods.serac_artifact import ROUTER, SeracEdit
from tests.helpers import run_json

ZSRE = str(sample_path("zsre"))


@pytest.fixture(scope="module")
def serac_dir(tmp_path_factory, tiny_model_dir):
    """A scope classifier trained on the first 120 records of the zsRE sample (tiny model)."""
    out = tmp_path_factory.mktemp("serac")
    hp = out / "hp.json"
    hp.write_text(json.dumps({"checkpoint_every": 40, "val_n": 10}))
    code = main(["train", "--method", "serac", "--dataset", "zsre", "--data", ZSRE, "--n", "120", "--model",
                 str(tiny_model_dir), "--out", str(out / "editor"), "--steps", "120", "--hparams", str(hp), "--json",
                 "--threads", "1"])
    assert code == 0
    return out / "editor"


@pytest.fixture
def lm(tiny_model_dir):
    from fedit.models.loading import load_model

    return load_model(str(tiny_model_dir), device="cpu")


def _logits(lm, text):
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return lm.model(input_ids=ids).logits[0]


def test_training_reports_routing_on_held_out_edits(serac_dir):
    info = json.loads((serac_dir / "editor.json").read_text())
    val = info["training"]["history"][-1]["validation"]
    assert val["route_in_scope"] >= 0.8 and val["route_out_of_scope"] >= 0.9, val


def test_router_sends_in_scope_inputs_to_the_edit_and_leaves_others_alone(serac_dir, lm):
    recs = load_records("zsre", ZSRE)[200:210]  # never trained on (the classifier saw records 0-119)
    out = edit(lm, [r.request for r in recs], method="serac", overrides={"archive": str(serac_dir)})
    router = lm.model.__dict__[ROUTER]
    hits = router.route([r.request.filled_prompt for r in recs] + [r.paraphrases[0] for r in recs])
    assert sum(h is not None and h[1] == i % 10 for i, h in enumerate(hits)) >= 16, hits
    misses = router.route([r.neighborhood[0].prompt for r in recs])
    assert sum(h is None for h in misses) >= 9, misses
    out.applied.revert()
    assert ROUTER not in lm.model.__dict__


def test_routed_rows_answer_with_the_edit_in_context_and_revert_is_exact(serac_dir, lm):
    recs = load_records("zsre", ZSRE)[200:203]
    weights = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    base_in = _logits(lm, recs[0].request.filled_prompt)
    base_out = _logits(lm, recs[0].neighborhood[0].prompt)
    res = edit(lm, [r.request for r in recs], method="serac", overrides={"archive": str(serac_dir)})
    in_scope = _logits(lm, recs[0].request.filled_prompt)
    assert not torch.allclose(in_scope, base_in)  # answered by the model with the edit in its context
    ctx = "{0} {1}.\n{0} {1}.\n".format(recs[0].request.filled_prompt, recs[0].request.target_new)
    res.applied.revert()
    with_ctx = _logits(lm, ctx + recs[0].request.filled_prompt)
    torch.testing.assert_close(in_scope, with_ctx[-in_scope.shape[0]:], rtol=1e-4, atol=1e-4)
    res = edit(lm, [r.request for r in recs], method="serac", overrides={"archive": str(serac_dir)})
    assert torch.equal(_logits(lm, recs[0].neighborhood[0].prompt), base_out)  # out of scope: untouched
    res.applied.revert()
    body = lm.adapter.body()
    assert not body._forward_hooks and not body._forward_pre_hooks
    assert torch.equal(_logits(lm, recs[0].request.filled_prompt), base_in)
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, weights[n]), n


def test_two_memories_share_one_router_and_generation_routes(serac_dir, lm):
    recs = load_records("zsre", ZSRE)[200:202]
    a = edit(lm, [recs[0].request], method="serac", overrides={"archive": str(serac_dir)})
    b = edit(lm, [recs[1].request], method="serac", overrides={"archive": str(serac_dir)})
    router = lm.model.__dict__[ROUTER]
    assert len(router.memories) == 2
    ids = lm.tokenizer(recs[1].request.filled_prompt, return_tensors="pt")["input_ids"]
    before = router.routed
    lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                      pad_token_id=lm.tokenizer.eos_token_id)
    assert router.routed >= before + 3  # the prompt and every generated step went through the edit
    a.applied.revert()
    assert len(router.memories) == 1 and ROUTER in lm.model.__dict__
    b.applied.revert()
    assert ROUTER not in lm.model.__dict__


def test_save_load_round_trip(serac_dir, lm, tmp_path):
    recs = load_records("zsre", ZSRE)[200:203]
    res = edit(lm, [r.request for r in recs], method="serac", overrides={"archive": str(serac_dir)}, apply=False)
    art = res.deltas
    path = art.save(tmp_path / "serac.safetensors")
    back = SeracEdit.load(path)
    assert back.requests == art.requests and back.hparams == art.hparams and back.model == lm.identity()
    assert back.metadata()["memory"] == 3 and back.method == "serac"
    for k, v in art.classifier.items():
        assert torch.equal(back.classifier[k], v)
    with art.applied(lm.model):
        want = _logits(lm, recs[1].paraphrases[0])
    with back.bind(lm.tokenizer).with_originals(lm.model).applied(lm.model):
        got = _logits(lm, recs[1].paraphrases[0])
    assert torch.equal(want, got)
    from fedit.memory import load_edit

    assert isinstance(load_edit(path), SeracEdit)  # what fedit apply/revert open a file with


def test_eval_serac_end_to_end(serac_dir, tiny_model_dir, tmp_path, capsys):
    code, rep = run_json(capsys, main, ["eval", "--method", "serac", "--editor", str(serac_dir), "--dataset", "zsre",
                                        "--data", ZSRE, "--n", "4", "--fluency-n", "0", "--model",
                                        str(tiny_model_dir), "--out", str(tmp_path / "ev"), "--json", "--threads", "1"])
    assert code == 0 and rep["metrics"]["locality"] >= 0.9
