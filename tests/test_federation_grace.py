"""FedEdit with GRACE: codebook entries shared through the MKV store (no request text), reused
without optimising, and checked on arrival; on tiny models, engine-free and through Flower."""

import json

import pytest
import torch

from fedit import hparams_for
from fedit.cli.main import main
from fedit.core.probe import continuation_logprob
from fedit.federation.codebook import COUNT, KEYS, RADII, VALUES, CodebookClient, CodebookServer, federating
from fedit.federation.fededit import FedError, MKVBatch
from fedit.federation.settings import FedSettings, SettingsError
from fedit.federation.store import MKVStore
from fedit.testing import tiny_model

from helpers import CORPUS, DARRIEUX, EIFFEL, JORDAN, resources, run_json

# A tiny random model cannot push a target much below NLL 4 through one layer's output at one
# position: stop at 5 (from ~11), so that a value that already gives the target is "answered".
HP = {"layers": [2], "lr": 1.0, "n_iter": 60, "nll_stop": 5.0}
UNRELATED = "The chemical symbol of gold is"


def _client(cid, lm, tiny_cache, **kw):
    return CodebookClient(cid, lm, hparams_for("grace", lm, HP), resources(tiny_cache), **kw)


def _logp(lm, req):
    (lp, _), = continuation_logprob(lm, [req.filled_prompt], [req.target_new])
    return lp


def _logits(lm, text):
    with torch.no_grad():
        return lm.model(lm.tokenizer(text, return_tensors="pt")["input_ids"]).logits


def _exchange(a, b, tiny_cache):
    """Slot 0: a edits Eiffel and Jordan, b edits Darrieux; every other client's entry is a hit."""
    server = CodebookServer(MKVStore(":memory:"), tau=-1)
    for c in (a, b):
        server.register(c.id)
    server.receive("a", 0, a.local_edit(0, [EIFFEL, JORDAN], ["a/0", "a/1"]))
    server.receive("b", 0, b.local_edit(0, [DARRIEUX], ["b/2"]))
    hits, _ = server.hits_for("b", 0)
    return server, MKVBatch.from_arrays(hits.to_arrays(), hits.meta)  # through the wire format


def test_reused_entries_edit_without_optimising_and_cover_a_later_edit_of_the_same_fact(tiny_cache):
    lm_a, lm_b = tiny_model("gpt2"), tiny_model("gpt2")
    a, b = _client("a", lm_a, tiny_cache), _client("b", lm_b, tiny_cache)
    base = {r.case_id: _logp(lm_b, r) for r in (EIFFEL, JORDAN, DARRIEUX)}
    unrelated = _logits(lm_b, UNRELATED)
    _, wire = _exchange(a, b, tiny_cache)
    # what travels: the fact token, the base model, the layer and the store id, no text
    assert all(set(m) == {"fact", "fingerprint", "layer", "mkv"} for m in wire.meta)
    assert {KEYS, VALUES, RADII, COUNT} <= set(wire.payloads[0]) and "z" not in wire.payloads[0]
    assert b.reuse(0, wire)["applied"] == 2 and b.report.reused == 2 and b.report.mkvs_computed == 1
    # b now answers a's facts as a does (same entries), its own too; unrelated text is untouched
    for r in (EIFFEL, JORDAN):
        assert _logp(lm_b, r) > base[r.case_id] + 3 and abs(_logp(lm_b, r) - _logp(lm_a, r)) < 1e-4
    assert _logp(lm_b, DARRIEUX) > base[DARRIEUX.case_id] + 3
    assert torch.equal(_logits(lm_b, UNRELATED), unrelated)
    # slot 1: b must edit Eiffel too; a's entry already answers it: nothing optimised or uploaded
    assert len(b.local_edit(1, [EIFFEL], ["b/0"])) == 0
    assert b.report.covered == 1 and b.report.mkvs_computed == 1 and b.report.own_facts == 2
    # the same entries again are held already
    assert b.reuse(1, wire)["held"] == 2
    # the saved state rebuilds the same model in a fresh client; to_base leaves the model as it was
    with_edits = _logits(lm_b, EIFFEL.filled_prompt)
    b.to_base()
    assert torch.equal(_logits(lm_b, UNRELATED), unrelated)
    again = _client("b", lm_b, tiny_cache)
    again.load_state(b.state())
    assert torch.equal(_logits(lm_b, EIFFEL.filled_prompt), with_edits) and again.report.covered == 1
    again.to_base()


def _bad(wire, name, fn):
    payloads = [dict(p) for p in wire.payloads]
    payloads[0][name] = fn(payloads[0][name].clone())
    return MKVBatch(wire.vectors, payloads, wire.meta)


@pytest.mark.parametrize("case,change,message", [
    ("shape", lambda w: _bad(w, KEYS, lambda t: t[:, :-1]), "shapes"),
    ("nan", lambda w: _bad(w, VALUES, lambda t: t.fill_(float("nan"))), "NaN"),
    ("huge value", lambda w: _bad(w, VALUES, lambda t: t * 1e4), "value norm"),
    ("huge radius", lambda w: _bad(w, RADII, lambda t: t * 1e3), "radii"),
    ("zero radius", lambda w: _bad(w, RADII, lambda t: t * 0), "radii"),
    ("other model", lambda w: MKVBatch(w.vectors, w.payloads, [{**w.meta[0], "fingerprint": "x"}, *w.meta[1:]]),
     "base model"),
])
def test_received_entries_of_the_wrong_shape_or_scale_are_refused(tiny_cache, case, change, message):
    lm_a, lm_b = tiny_model("gpt2"), tiny_model("gpt2")
    a, b = _client("a", lm_a, tiny_cache), _client("b", lm_b, tiny_cache)
    _, wire = _exchange(a, b, tiny_cache)
    before = {k: v.clone() for k, v in b.book.items()}
    with pytest.raises(FedError, match=message):
        b.reuse(0, change(wire))
    assert all(torch.equal(b.book[k], before[k]) for k in before)  # nothing of the batch was taken
    b.to_base()


def test_an_entry_covering_unrelated_text_is_refused(tiny_cache):
    lm_a, lm_b = tiny_model("gpt2"), tiny_model("gpt2")
    a, b = _client("a", lm_a, tiny_cache), _client("b", lm_b, tiny_cache)
    _, wire = _exchange(a, b, tiny_cache)
    from fedit.federation.codebook import reference_scale

    ref = reference_scale(lm_b, 2, resources(tiny_cache)).keys[5]  # a position of the reference text
    with pytest.raises(FedError, match="unrelated reference text"):
        b.reuse(0, _bad(wire, KEYS, lambda t: torch.stack([ref] * t.shape[0])))
    b.to_base()


def test_only_methods_that_federate_are_taken():
    assert set(federating()) == {"memit", "pmet", "alphaedit", "grace"}
    for method in ("wise", "rome", "ike"):
        with pytest.raises(SettingsError, match="cannot take part in FedEdit") as e:
            FedSettings(method=method)
        assert "grace" in str(e.value) and "memit" in str(e.value)
    with pytest.raises(SettingsError, match="private mode only"):
        FedSettings(method="grace", mode="paper", share_requests=True)
    with pytest.raises(SettingsError, match="baseline"):
        FedSettings(method="grace", baseline="fedavg")
    with pytest.raises(SettingsError, match="overlap"):
        FedSettings(overlap=6, n_per_client=6)


def test_fed_run_refuses_a_method_that_cannot_federate(capsys, tmp_path):
    code, r = run_json(capsys, main, ["fed", "run", "--method", "wise", "--out", str(tmp_path), "--json"])
    assert code == 2 and "cannot take part in FedEdit" in r["error"] and "grace" in r["error"]


def test_fed_run_grace_on_flower_reuses_and_covers_shared_facts(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "hp.json").write_text(json.dumps(HP))
    out = tmp_path / "out"
    # client 0's first record is also the last of clients 1 and 2: they meet it in slot 1, after
    # receiving client 0's entries for it in slot 0 (τ = -1: every other client's entry is a hit)
    code, r = run_json(capsys, main, [
        "fed", "run", "--method", "grace", "--model", str(tiny_model_dir), "--hparams", str(tmp_path / "hp.json"),
        "--corpus", str(CORPUS), "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--clients", "3",
        "--slots", "2", "--n-per-client", "3", "--overlap", "1", "--tau", "-1", "--json", "--out", str(out)])
    assert code == 0, r
    ru = r["reuse"]
    # slot 0: 2 facts each, all 6 shared (12 reuses); slot 1: client 0 uploads 1, the others' one fact
    # is the shared one, already answered: covered, nothing optimised, nothing uploaded
    assert ru["mkvs_uploaded"] == 7 and ru["mkvs_reused"] == 12 and ru["own_edits_covered"] == 2
    # the saving is an estimate derived from the run's own cost per optimised MKV, not a measured speed
    assert ru["covered_seconds_saved_estimate"] == pytest.approx(2 * ru["seconds_per_mkv"], abs=2e-3)
    assert [r["per_client"][c]["covered"] for c in ("client-0", "client-1", "client-2")] == [0, 1, 1]
    assert r["centralised"] is not None and "answered by reused entries" in (out / "report.md").read_text()
    with MKVStore(out / "mkv.sqlite") as st:  # entries, no request text, no labels
        rows = st.for_slot(0)
        assert len(rows) == 6 and all(set(m.meta) == {"fact", "fingerprint", "layer"} for m in rows)
        assert all(set(m.payload) == {KEYS, VALUES, RADII, COUNT} for m in rows)


def test_a_key_is_the_same_input_as_itself_at_the_default_models_scale():
    # 2048-d keys of norm ~3.7, as Gemma 3 270M's layer-13 MLP activations: in float32 the expanded
    # distance left a key ~1.4e-3 from itself, above GRACE's "same input again" tolerance (1e-3 ε),
    # so a received entry for the same prompt was split instead of taken (and its edit failed)
    from fedit.methods.grace import distances

    keys = torch.randn(8, 2048, generator=torch.Generator().manual_seed(0)).abs() * 0.08
    assert float(distances(keys, keys).diag().max()) < 1e-5
