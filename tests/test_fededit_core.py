"""FedEdit's client and server roles without any federation engine, on tiny models."""

import pytest
import torch

from fedit import hparams_for
from fedit.core.probe import continuation_logprob
from fedit.federation.fededit import FedEditClient, FedError, MKVBatch, average_updates
from fedit.testing import tiny_model

from helpers import CORPUS, DARRIEUX, EIFFEL, FAST, JORDAN, resources

OVER = {**FAST, "v_lr": 1.0, "v_num_grad_steps": 25, "clamp_norm_factor": 8.0, "layers": [1, 2],
        "mom2_update_weight": 10.0}


def _client(cid, lm, tiny_cache, mode="private", share=False):
    return FedEditClient(cid, lm, hparams_for("memit", lm, OVER), resources(tiny_cache), mode=mode,
                         share_requests=share)


def test_private_reedit_equals_local_edit_of_the_same_fact(tiny_cache):
    lm_a, lm_b = tiny_model("gpt2"), tiny_model("gpt2")
    a, b = _client("a", lm_a, tiny_cache), _client("b", lm_b, tiny_cache)
    up = a.local_edit(0, [EIFFEL], ["f0"])
    assert len(up) == 1 and "request" not in up.meta[0] and set(up.payloads[0]) == {"key.1", "resid.1", "key.2", "resid.2"}
    # Through the wire format and back, then reused by b without any request text.
    wire = MKVBatch.from_arrays(up.to_arrays(), up.meta)
    info = b.reuse(0, wire)
    assert info["applied"] == 1 and b.report.mkvs_computed == 0
    da, db = a.current_deltas(), b.current_deltas()
    assert set(da) == set(db)
    for n in da:
        assert torch.allclose(da[n], db[n], atol=1e-5 * float(da[n].abs().max())), n
    (pa, _), = continuation_logprob(lm_a, [EIFFEL.filled_prompt], ["Rome"])
    (pb, _), = continuation_logprob(lm_b, [EIFFEL.filled_prompt], ["Rome"])
    assert abs(pa - pb) < 1e-4


def test_client_state_round_trip_and_own_plus_reused(tiny_cache):
    lm = tiny_model("gpt2")
    a = _client("a", lm, tiny_cache)
    a.local_edit(0, [EIFFEL, JORDAN], ["f0", "f1"])
    other = _client("b", tiny_model("gpt2"), tiny_cache).local_edit(0, [DARRIEUX], ["f2"])
    a.reuse(0, other)
    assert a.fact_ids == ["f0", "f1", "f2"] and a.report.reused == 1 and a.report.own_facts == 2
    before = a.current_deltas()
    st = a.state()
    a.to_base()
    fresh = _client("a", lm, tiny_cache)
    fresh.load_state(st)
    after = fresh.current_deltas()
    assert all(torch.allclose(before[n], after[n]) for n in before)
    assert fresh.report.reused == 1


def test_paper_mode_needs_opt_in_to_reuse(tiny_cache):
    a = _client("a", tiny_model("gpt2"), tiny_cache, mode="paper", share=False)
    up = a.local_edit(0, [EIFFEL], ["f0"])
    assert up.payloads == [{}] and "request" not in up.meta[0]
    b = _client("b", tiny_model("gpt2"), tiny_cache, mode="paper")
    info = b.reuse(0, up)
    assert (info["hits"], info["applied"], info["unusable"]) == (1, 0, 1)
    shared = _client("c", tiny_model("gpt2"), tiny_cache, mode="paper", share=True).local_edit(0, [EIFFEL], ["f0"])
    assert shared.meta[0]["request"]["subject"] == "Eiffel Tower"
    lm = tiny_model("gpt2")
    (before, _), = continuation_logprob(lm, [EIFFEL.filled_prompt], ["Rome"])
    d = _client("d", lm, tiny_cache, mode="paper")
    assert d.reuse(0, shared)["applied"] == 1
    (after, _), = continuation_logprob(lm, [EIFFEL.filled_prompt], ["Rome"])
    assert after > before + 0.5


def test_reuse_refuses_bad_mkvs_one_by_one_and_applies_the_rest(tiny_cache):
    b = _client("b", tiny_model("gpt2"), tiny_cache)
    up = _client("a", tiny_model("gpt2"), tiny_cache).local_edit(0, [EIFFEL], ["f0"])
    nan = dict(up.payloads[0])
    nan["resid.1"] = nan["resid.1"].clone()
    nan["resid.1"][0] = float("nan")
    spoofed = {**up.meta[0], "fingerprint": "other"}
    bad = MKVBatch(up.vectors.repeat(3, 1), [nan, dict(up.payloads[0]), dict(up.payloads[0])],
                   [dict(up.meta[0]), spoofed, dict(up.meta[0])], owner="a")
    info = b.reuse(0, bad)
    assert info["applied"] == 1 and [r["reason"] for r in info["rejected"]][0].endswith("NaN or Inf")
    assert "base model" in info["rejected"][1]["reason"] and {r["from"] for r in info["rejected"]} == {"a"}
    assert b.report.rejected == 2 and len(b.vectors) == 1  # the good copy was applied
    c = _client("c", tiny_model("gpt2"), tiny_cache)
    info = c.reuse(0, MKVBatch(torch.zeros(1, 5), [{}], [{"fact": "x", "fingerprint": c.fingerprint}]))
    assert info["applied"] == 0 and "shape" in info["rejected"][0]["reason"]
    assert c.vectors is None and c.current_deltas() == {}  # nothing was taken
    with pytest.raises(FedError, match="one row per fact"):
        MKVBatch.from_arrays({"mkv": torch.zeros(2, 4)}, [{}])


def test_average_updates_is_the_plain_mean():
    u1 = {"w": torch.ones(2, 2)}
    u2 = {"w": 3 * torch.ones(2, 2), "v": torch.ones(1)}
    avg = average_updates([u1, u2])
    assert torch.equal(avg["w"], 2 * torch.ones(2, 2)) and torch.equal(avg["v"], 0.5 * torch.ones(1))


def test_delta_matching_indexes_the_edit_direction_and_keeps_z(tiny_cache):
    lm = tiny_model("gpt2")
    a = FedEditClient("a", lm, hparams_for("memit", lm, OVER), resources(tiny_cache), match="delta")
    up = a.local_edit(0, [EIFFEL], ["f0"])
    z = up.payloads[0]["z"]
    assert not torch.allclose(up.vectors[0], z)  # the index vector is z − h, not z
    b = _client("b", tiny_model("gpt2"), tiny_cache)
    wire = MKVBatch.from_arrays(up.to_arrays(), up.meta)
    assert torch.equal(wire.vectors, up.vectors) and torch.equal(wire.payloads[0]["z"], z)  # both survive the wire
    b.reuse(0, wire)
    assert torch.allclose(b.vectors.zs[0], z)  # the receiver solved with z from the payload
    da, db = a.current_deltas(), b.current_deltas()
    assert all(torch.allclose(da[n], db[n], atol=1e-5 * float(da[n].abs().max())) for n in da)


def test_fed_demo_runs_three_organisations_on_a_tiny_model(tiny_cache):
    from fedit.cli.demo import ORGS, run_fed_demo
    from fedit.cli.common import probe as _probe, table as _table

    lm = tiny_model("gpt2")
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    out, text = run_fed_demo(lm, resources(tiny_cache), tiny_cache, _probe, _table, tau=-1.0, overrides=OVER)
    orgs = out["organisations"]
    assert set(orgs) == set(ORGS)
    # tau = -1: every organisation reuses the other two's facts and computes only its own
    assert all(o["mkvs_computed"] == 2 and o["mkvs_reused"] == 4 for o in orgs.values())
    assert out["mkv_computations_saved"] == 12 and "hospital-north" in text
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())  # base model left as it was


def test_pmet_clients_share_vectors_and_alphaedit_needs_paper_mode(tiny_cache):
    over = {**FAST, "layers": [1, 2], "v_lr": 0.5}
    lm_a, lm_b = tiny_model("gpt2"), tiny_model("gpt2")
    a = FedEditClient("a", lm_a, hparams_for("pmet", lm_a, over), resources(tiny_cache), method="pmet")
    b = FedEditClient("b", lm_b, hparams_for("pmet", lm_b, over), resources(tiny_cache), method="pmet")
    b.reuse(0, MKVBatch.from_arrays(a.local_edit(0, [EIFFEL], ["f0"]).to_arrays(), [{"fact": "f0", "fingerprint": a.fingerprint}]))
    da, db = a.current_deltas(), b.current_deltas()
    assert da and all(torch.allclose(da[n], db[n], atol=1e-5 * float(da[n].abs().max())) for n in da)
    ae = hparams_for("alphaedit", lm_a, over)
    with pytest.raises(FedError, match="private mode"):
        FedEditClient("c", lm_a, ae, resources(tiny_cache), method="alphaedit")
    c = FedEditClient("c", tiny_model("gpt2"), ae, resources(tiny_cache), mode="paper", share_requests=True,
                      method="alphaedit")
    up = c.local_edit(0, [EIFFEL], ["f0"])
    d = FedEditClient("d", tiny_model("gpt2"), ae, resources(tiny_cache), mode="paper", method="alphaedit")
    assert d.reuse(0, up)["applied"] == 1 and d.current_deltas()


def test_alphaedit_client_carries_its_keys_across_slots_and_through_its_saved_state(tiny_cache):
    over = {**FAST, "layers": [1, 2], "v_lr": 0.5}
    lm = tiny_model("gpt2")
    ae = hparams_for("alphaedit", lm, over)
    c = FedEditClient("c", lm, ae, resources(tiny_cache), mode="paper", share_requests=True, method="alphaedit")
    c.local_edit(0, [EIFFEL], ["f0"])
    first = {l: t.clone() for l, t in c.method_state.kk.items()}
    assert c.method_state.edits == 1
    c.local_edit(1, [JORDAN, DARRIEUX], ["f1", "f2"])
    assert c.method_state.edits == 3
    assert all(not torch.equal(first[l], c.method_state.kk[l]) for l in first)  # slot 2's keys added
    saved, deltas = c.state(), c.current_deltas()
    # an engine may rebuild the client in a new process from its saved state
    d = FedEditClient("c", tiny_model("gpt2"), ae, resources(tiny_cache), mode="paper", share_requests=True,
                      method="alphaedit")
    d.load_state(saved)
    assert d.method_state.edits == 3
    assert all(torch.equal(d.method_state.kk[l], c.method_state.kk[l]) for l in first)
    assert all(torch.allclose(d.current_deltas()[n], deltas[n]) for n in deltas)


def test_centralised_reference_optimises_only_the_targets_it_is_not_given(tiny_cache, tmp_path):
    """Given z for some facts, the reference reuses them and optimises the rest: the same edit
    as when every z is given, with only the missing ones computed."""
    import json

    from fedit.data.loaders import load_records
    from fedit.federation.report import centralised_reference
    from fedit.federation.settings import FedSettings
    from fedit.methods.targets import targets_for

    lm = tiny_model("gpt2")
    (tmp_path / "hp.json").write_text(json.dumps(OVER))
    settings = FedSettings(cache_dir=tiny_cache, corpus=str(CORPUS), hparams_file=str(tmp_path / "hp.json"))
    recs = load_records("counterfact", None, 4)
    by_client = {"a": recs[:2], "b": recs[2:]}
    ids = [f"{c}/{r.case_id}" for c, rs in by_client.items() for r in rs]
    res = resources(tiny_cache)
    hp = hparams_for("memit", lm, OVER)
    zs = targets_for(lm, [r.request for r in recs], hp, res.templates(lm, hp.context_template_length_params))[0]
    full = centralised_reference(lm, by_client, settings, zs=dict(zip(ids, zs)), resources=res)
    part = centralised_reference(lm, by_client, settings, zs={ids[0]: zs[0], ids[3]: zs[3]}, resources=res)
    assert full["zs_reused"] == 4 and part["zs_reused"] == 2
    assert part["metrics"] == pytest.approx(full["metrics"], rel=1e-3, abs=1e-4)
    assert part["metrics"]["efficacy_magnitude"] > part["metrics_pre"]["efficacy_magnitude"]  # it edits
