"""Poisoned MKVs through FedEdit's engine-neutral path (server + store + clients, no Flower), on
tiny models: the server and each receiver refuse what does not fit the receiver's own model,
apply the rest, and the refusals name the sender."""

import pytest
import torch

from fedit import hparams_for
from fedit.errors import StoreError
from fedit.federation.fededit import FedEditClient, FedEditServer, MKVBatch
from fedit.federation.guard import DEFAULT_NORM_FACTOR, Guard, measure_scale
from fedit.federation.store import MKVStore
from fedit.testing import tiny_model

from helpers import EIFFEL, FAST, JORDAN, load_script, resources

OVER = {**FAST, "v_lr": 1.0, "v_num_grad_steps": 15, "clamp_norm_factor": 8.0, "layers": [1, 2],
        "mom2_update_weight": 10.0}


def _client(cid, tiny_cache, arch="gpt2"):
    lm = tiny_model(arch)
    return FedEditClient(cid, lm, hparams_for("memit", lm, OVER), resources(tiny_cache))


def _poisoned(up: MKVBatch) -> MKVBatch:
    """Four MKVs built from an honest one: residual × 1e15, NaN key, wrong-shape key, spoofed base."""
    p = up.payloads[0]
    scaled = {**p, "resid.1": p["resid.1"] * 1e15}
    nan = {**p, "key.2": torch.full_like(p["key.2"], float("nan"))}
    short = {**p, "key.1": p["key.1"][: p["key.1"].shape[0] // 2]}
    metas = [{"fact": f"m{i}", "fingerprint": up.meta[0]["fingerprint"]} for i in range(3)]
    metas.append({"fact": "m3", "fingerprint": "0123456789abcdef"})
    return MKVBatch(up.vectors.repeat(4, 1), [scaled, nan, short, dict(p)], metas, owner="mallory")


def _federate(a_up, b_state, tiny_cache, extra=None):
    """One slot with honest a and b (and ``extra`` uploads); b reuses its hits on a fresh copy of the model."""
    with MKVStore(":memory:") as store:
        server = FedEditServer(store, tau=-1.0)  # every other client's MKV is a hit
        for c in ["a", "b", *(extra or {})]:
            server.register(c)
        stored, refused = server.receive_slot(0, {"a": a_up, "b": b_state["upload"], **(extra or {})})
        hits, info = server.hits_for("b", 0)
        b = _client("b", tiny_cache)
        b.load_state(b_state["state"])
        got = b.reuse(0, hits)
        refused += server.senders(got["rejected"], "b", info)
        return b, got, stored, refused


def test_poisoned_mkvs_are_refused_honest_weights_stay_as_in_the_honest_run(tiny_cache):
    a, b = _client("a", tiny_cache), _client("b", tiny_cache)
    a_up = a.local_edit(0, [EIFFEL], ["fa"])
    b_up = b.local_edit(0, [JORDAN], ["fb"])
    b_state = {"upload": b_up, "state": b.state()}
    honest, info, _, refused = _federate(a_up, b_state, tiny_cache)
    assert info["applied"] == 1 and not refused
    want = honest.current_deltas()

    poisoned, info, stored, refused = _federate(a_up, b_state, tiny_cache, {"mallory": _poisoned(a_up)})
    assert stored == {"a": 1, "b": 1, "mallory": 2}  # NaN and wrong shape never reach the store
    assert info["applied"] == 1 and len(info["rejected"]) == 2  # a's MKV applied, mallory's two refused
    assert {r["from"] for r in refused} == {"mallory"} and len(refused) == 4
    reasons = {r["fact"]: (r["by"], r["reason"]) for r in refused}
    assert reasons["m0"][0] == "b" and "over the bound" in reasons["m0"][1] and "resid.1" in reasons["m0"][1]
    assert reasons["m1"] == ("server", "key.2 holds NaN or Inf")
    assert reasons["m2"][0] == "server" and "layout" in reasons["m2"][1]
    assert reasons["m3"][0] == "b" and "0123456789abcdef" in reasons["m3"][1]
    got = poisoned.current_deltas()
    assert set(got) == set(want)
    for n in want:
        assert torch.isfinite(got[n]).all()
        assert torch.allclose(got[n], want[n], atol=1e-5 * float(want[n].abs().max())), n


def test_the_receiver_checks_shapes_and_base_itself_whatever_the_server_let_through(tiny_cache):
    a, b = _client("a", tiny_cache), _client("b", tiny_cache)
    up = a.local_edit(0, [EIFFEL], ["fa"])
    bad = _poisoned(up)
    info = b.reuse(0, bad)  # straight to the receiver: no server check on the way
    assert info["applied"] == 0 and b.vectors is None and b.current_deltas() == {}
    reasons = [r["reason"] for r in info["rejected"]]
    assert "over the bound" in reasons[0] and reasons[1] == "key.2 holds NaN or Inf"
    assert "key.1 has shape" in reasons[2] and "0123456789abcdef" in reasons[3]
    assert all(r["from"] == "mallory" for r in info["rejected"])
    # an MKV whose index vector does not have this model's width
    info = b.reuse(0, MKVBatch(torch.ones(1, 5), [dict(up.payloads[0])], [dict(up.meta[0])]))
    assert info["applied"] == 0 and "mkv has shape [5], this model's is [64]" in info["rejected"][0]["reason"]


def test_real_mkvs_of_tiny_models_lie_well_inside_the_default_bound(tiny_cache):
    ratios = load_script("mkv_bounds").ratios
    for arch in ("gpt2", "gemma3_text"):
        c = _client("a", tiny_cache, arch)
        up = c.local_edit(0, [EIFFEL, JORDAN], ["0", "1"])
        c.to_base()
        worst = max(ratios(c, up).values())
        assert 0 < worst < DEFAULT_NORM_FACTOR / 2, (arch, worst)


def test_a_stored_record_over_the_bound_is_refused_on_every_read_path(tiny_cache):
    a = _client("a", tiny_cache)
    up = a.local_edit(0, [EIFFEL], ["fa"])
    a.to_base()
    guard = Guard(measure_scale(a.lm, OVER["layers"]))
    with MKVStore(":memory:", check=guard.for_store("private", "z")) as store:
        store.register_client("a")
        store.register_client("b")
        good = store.add("a", 0, up.vectors, up.payloads, up.meta)
        p = up.payloads[0]
        (bad,) = store.add("a", 0, up.vectors * 1e6, [dict(p)], [dict(up.meta[0])])
        assert len(store.get(good)) == 1
        for read in (lambda: store.get([bad]), lambda: store.for_slot(0),
                     lambda: store.retrieve_fededit("b", 0, up.vectors, tau=-1.0)):
            with pytest.raises(StoreError, match=f"record {bad} \\(owner 'a', slot 0\\) is refused: mkv has norm"):
                read()
