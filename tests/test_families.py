"""FT-L, FT-M, GRACE, WISE and IKE on tiny models: they edit, revert exactly, save and load, and
the memory methods keep base weights and unrelated inputs as they were."""

import pytest
import torch

from fedit import edit, load_edit, sequential_edit
from fedit.core.probe import describe
from fedit.evaluate.checkpoint import _state_from_file, _state_to_file
from fedit.memory import MemoryEdit
from fedit.methods import get_method, names
from fedit.testing import tiny_model

from helpers import DARRIEUX, EIFFEL, JORDAN, resources

UNRELATED = "The quick brown fox jumps over the lazy dog because"
FAST = {
    "ft-l": {"layers": [1], "lr": 1e-2, "norm_constraint": 2e-2},
    "ft-m": {"layers": [1], "lr": 1e-2},
    "grace": {"layers": [2], "lr": 1.0, "n_iter": 40},
    "wise": {"layers": [2], "n_iter": 40},
    "ike": {"k": 2},
}


def _p(lm, req):
    return describe(lm, req.filled_prompt, req.target_new)["target_prob"]


def _logits(lm, text):
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return lm.model(ids).logits


def _weights(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def test_registered_with_their_families():
    assert {"ft-l", "ft-m", "grace", "wise", "ike"} <= set(names())
    assert set(names(family="fine-tuning")) >= {"ft-l", "ft-m"}
    assert set(names(family="memory-based")) >= {"grace", "wise"}
    assert names(family="in-context") == ["ike"]
    assert all(get_method(m).stateful for m in ("grace", "wise", "ike"))


@pytest.mark.parametrize("method", ["ft-l", "ft-m"])
def test_fine_tuning_edits_one_weight_and_reverts(method, tiny_cache):
    lm = tiny_model("gpt2")
    w0 = _weights(lm)
    p0 = _p(lm, EIFFEL)
    res = edit(lm, [EIFFEL], method=method, overrides=FAST[method], resources=resources(tiny_cache))
    assert _p(lm, EIFFEL) > 5 * p0
    (name,) = res.deltas.deltas
    assert name == lm.adapter.w_out_param_name(1)
    if method == "ft-l":  # the update stays inside the L∞ ball
        assert float(res.deltas.deltas[name].abs().max()) <= 2e-2 + 1e-6
    res.applied.revert()
    assert all(torch.equal(p, w0[n]) for n, p in lm.model.named_parameters())


@pytest.mark.parametrize("method", ["grace", "wise", "ike"])
def test_memory_methods_edit_without_touching_weights(method, tiny_cache, tmp_path):
    lm = tiny_model("gpt2")
    w0 = _weights(lm)
    p0, base = _p(lm, EIFFEL), _logits(lm, EIFFEL.filled_prompt)
    res = edit(lm, [EIFFEL], method=method, overrides=FAST[method], resources=resources(tiny_cache))
    assert isinstance(res.deltas, MemoryEdit)
    assert all(torch.equal(p, w0[n]) for n, p in lm.model.named_parameters())
    if method != "ike":  # a random tiny model does not learn in context
        assert _p(lm, EIFFEL) > 5 * p0
    edited = _logits(lm, EIFFEL.filled_prompt)
    assert not torch.allclose(edited, base)
    res.applied.revert()
    assert torch.equal(_logits(lm, EIFFEL.filled_prompt), base)
    back = load_edit(res.deltas.save(tmp_path / "e.safetensors"))
    assert back.method == method and back.requests[0]["target_new"] == "Rome"
    with back.applied(lm.model):
        assert torch.equal(_logits(lm, EIFFEL.filled_prompt), edited)
    assert torch.equal(_logits(lm, EIFFEL.filled_prompt), base)


@pytest.mark.parametrize("method", ["grace", "wise"])
def test_unrelated_input_is_left_alone(method, tiny_cache):
    lm = tiny_model("gpt2")
    base = _logits(lm, UNRELATED)
    res = edit(lm, [EIFFEL], method=method, overrides=FAST[method], resources=resources(tiny_cache))
    assert torch.equal(_logits(lm, UNRELATED), base)
    res.applied.revert()


def test_grace_radius_decides_what_is_replaced(tiny_cache):
    lm = tiny_model("gpt2")
    res = edit(lm, [EIFFEL], method="grace", overrides={**FAST["grace"], "eps": 1e-3}, resources=resources(tiny_cache))
    book = res.deltas.tensors
    n = book["keys"].shape[0]
    assert n == 1 and book["labels"].tolist() == [lm.tokenizer(" Rome")["input_ids"][0]]
    # a paraphrase's key is farther than a tiny radius: it is not replaced
    para = "Where is the Eiffel Tower? It is in the city of"
    base = _logits(lm, para)
    assert torch.equal(_logits(lm, para), base)
    res.applied.revert()


@pytest.mark.parametrize("method", ["grace", "wise"])
def test_sequential_keeps_earlier_edits(method, tiny_cache):
    lm = tiny_model("gpt2")
    reqs = [EIFFEL, JORDAN, DARRIEUX]
    p0 = [_p(lm, r) for r in reqs]
    # a random tiny model's edits overlap in the side memory: route with a lower threshold
    overrides = {**FAST[method], "act_ratio": 0.5} if method == "wise" else FAST[method]
    res = sequential_edit(lm, [[r] for r in reqs], method=method, overrides=overrides,
                          resources=resources(tiny_cache))
    assert all(_p(lm, r) > 5 * p for r, p in zip(reqs, p0))  # the first edit survives two more
    for r in reversed(res):
        r.applied.revert()
    assert [_p(lm, r) for r in reqs] == p0


def test_ike_facts_accumulate(tiny_cache):
    lm = tiny_model("gpt2")
    res = sequential_edit(lm, [[EIFFEL], [JORDAN]], method="ike", overrides=FAST["ike"],
                          resources=resources(tiny_cache))
    facts = res[-1].outcome.state.facts
    assert len(facts) == 2 and facts[0] == "The Eiffel Tower is located in the city of Rome"
    for r in reversed(res):
        r.applied.revert()


@pytest.mark.parametrize("method", ["grace", "wise", "ike"])
def test_state_survives_a_checkpoint(method, tiny_cache):
    lm = tiny_model("gpt2")
    out = get_method(method).run(lm, [EIFFEL], _hp(lm, method), resources(tiny_cache))
    state = _state_from_file(_roundtrip(_state_to_file(out.state)), method)
    with state.memory_edit(lm).applied(lm.model):
        a = _logits(lm, EIFFEL.filled_prompt)
    with out.deltas.applied(lm.model):
        b = _logits(lm, EIFFEL.filled_prompt)
    assert torch.equal(a, b)


def _hp(lm, method):
    from fedit.methods import hparams_for

    return hparams_for(method, lm, FAST[method])


def _roundtrip(data):
    import io

    buf = io.BytesIO()
    torch.save(data, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_ike_context_is_what_the_model_reads(tiny_cache):
    lm = tiny_model("llama")
    res = edit(lm, [EIFFEL], method="ike", overrides={"k": 2}, resources=resources(tiny_cache))
    ctx = res.deltas.tensors["context"].tolist()
    query = lm.tokenizer(EIFFEL.filled_prompt)["input_ids"]
    with torch.no_grad():
        applied = lm.model(torch.tensor([query])).logits[0]
        res.applied.revert()
        bos = lm.model.config.bos_token_id
        joined = ctx + (query[1:] if query[0] == bos and ctx[0] == bos else query)
        direct = lm.model(torch.tensor([joined])).logits[0, -len(query):]
    assert torch.allclose(applied[-len(query) + (1 if query[0] == bos else 0):],
                          direct[-len(query) + (1 if query[0] == bos else 0):], atol=1e-5)
    # generation with a cache continues after the context
    with res.deltas.applied(lm.model):
        gen = lm.model.generate(torch.tensor([query]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    want = lm.model.generate(torch.tensor([joined]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert gen[0, len(query):].tolist() == want[0, len(joined):].tolist()


def test_memory_edit_refused_by_saved_model_commands(tmp_path, tiny_model_dir, capsys):
    from fedit.cli.main import main

    lm = tiny_model("gpt2")
    res = edit(lm, [EIFFEL], method="grace", overrides=FAST["grace"], apply=False)
    f = res.deltas.save(tmp_path / "g.safetensors")
    assert main(["revert", str(f), "--model", str(tiny_model_dir), "--json"]) == 2
    assert "nothing to revert" in capsys.readouterr().out
    assert main(["apply", str(f), "--model", str(tiny_model_dir), "--out", str(tmp_path / "m"), "--json"]) == 2
    assert "saved model folder" in capsys.readouterr().out
    # without --out it applies in memory and says how to keep it: the edit file, not --out
    assert main(["apply", str(f), "--model", str(tiny_model_dir), "-q"]) == 0
    said = capsys.readouterr().out
    assert "keep the edit file" in said and "pass --out" not in said


def test_cli_eval_grace_sequential(tmp_path, tiny_model_dir, capsys):
    from fedit.cli.main import main

    code = main(["eval", "--method", "grace", "--dataset", "zsre", "--n", "5", "--sequential", "--batch-size", "1",
                 "--layers", "2", "--model", str(tiny_model_dir), "--threads", "1", "--fluency-n", "0",
                 "--out", str(tmp_path / "run"), "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    import json

    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert rep["method"] == "grace" and rep["sequential"] and rep["n"] == 5
    assert rep["metrics"]["efficacy_acc"] > rep["metrics_pre"]["efficacy_acc"]


def test_grace_reediting_the_same_prompt_takes_the_newest_target(tiny_cache):
    lm = tiny_model("gpt2")
    other = EIFFEL.__class__(prompt=EIFFEL.prompt, subject=EIFFEL.subject, target_new="London", case_id=9)
    res = sequential_edit(lm, [[EIFFEL], [other]], method="grace", overrides=FAST["grace"],
                          resources=resources(tiny_cache))
    assert res[-1].deltas.tensors["keys"].shape[0] == 1  # one input, one entry
    assert describe(lm, EIFFEL.filled_prompt, "London")["top_token"] == " London"
    for r in reversed(res):
        r.applied.revert()


def test_tail_candidate_vocabulary_is_exact_where_chosen_and_close_between(tiny_cache):
    """Tail(vocab_subset=k): every vocab_refresh-th nll() is the full log-softmax; the calls in
    between read the candidates with the rest of the normaliser frozen, so on the same hidden
    states they give the same number, and a covering subset gives the full one every time."""
    from fedit.methods.hparams import check_vocab_subset
    from fedit.methods.tail import Tail, target_rows

    lm = tiny_model("gpt2")
    V = lm.model.config.vocab_size
    rows = target_rows(lm.tokenizer, [EIFFEL.filled_prompt, JORDAN.filled_prompt], [" Rome", " tennis"])
    full = Tail(lm, rows, 1).nll()
    sub = Tail(lm, rows, 1, vocab_subset=32, vocab_refresh=3)
    vals = [sub.nll() for _ in range(4)]  # exact, subset, subset, exact
    assert sub.calls_made == 4 and len(sub._sub[0]) < V
    for v in vals:
        assert torch.allclose(v, full, atol=1e-5)
    # a changed hidden state: the subset call moves the target's log-probability as the full one does,
    # up to the frozen tokens outside the candidates
    final = Tail(lm, rows, 1).final() * 1.05
    sub2 = Tail(lm, rows, 1, vocab_subset=32, vocab_refresh=3)
    sub2.nll()
    assert torch.allclose(sub2.nll(final), Tail(lm, rows, 1).nll(final), atol=0.05)
    every = Tail(lm, rows, 1, vocab_subset=V, vocab_refresh=2)
    every.nll()
    assert torch.allclose(every.nll(final), Tail(lm, rows, 1).nll(final), atol=1e-5)
    with pytest.raises(ValueError, match="vocab_subset"):
        Tail(lm, rows, 1, vocab_subset=-1)
    from fedit.errors import HparamsError
    with pytest.raises(HparamsError, match="vocab_refresh"):
        check_vocab_subset(8, 0)


@pytest.mark.parametrize("method", ["grace", "wise"])
def test_memory_methods_edit_with_a_candidate_vocabulary(method, tiny_cache):
    from fedit.errors import HparamsError
    from fedit.methods import hparams_for

    lm = tiny_model("gpt2")
    p0 = _p(lm, EIFFEL)
    res = edit(lm, [EIFFEL], method=method, overrides={**FAST[method], "vocab_subset": 64, "vocab_refresh": 5},
               resources=resources(tiny_cache))
    assert _p(lm, EIFFEL) > 5 * p0
    res.applied.revert()
    with pytest.raises(HparamsError, match="vocab_subset"):
        hparams_for(method, lm, {**FAST[method], "vocab_subset": -2})
