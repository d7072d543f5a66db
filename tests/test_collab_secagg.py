"""CollabEdit's confidentiality boundary: the clients' own salt, a SecAgg+ dropout, DP of the sums."""

import json
import math
import time

import pytest
import torch

from fedit.collab.keys import SealError, new_key_pair, open_sealed, seal
from fedit.collab.privacy import DPConfig, PrivacyError, accounting, clipped, epsilon, gdp_delta, noisy, release
from fedit.methods.vectors import EditVectors, LayerSums, layer_sums

from helpers import CORPUS, FAST

HP = {**FAST, "v_lr": 1.0, "clamp_norm_factor": 8.0, "mom2_update_weight": 10.0, "layers": [1, 2]}


# --- the digest salt: agreed between the clients, never seen by the server -------------------
def _message(kind: str, values: dict, node: int):
    from flwr.app import ConfigRecord, Metadata, RecordDict
    from flwr.app.message import make_message

    meta = Metadata(run_id=1, message_id=f"m{time.monotonic_ns()}", src_node_id=0, dst_node_id=node,
                    reply_to_message_id="", group_id=kind, created_at=time.time(), ttl=600.0, message_type=kind)
    return make_message(meta, RecordDict({"collab": ConfigRecord(values)}))


def test_clients_agree_a_salt_that_no_reply_carries():
    """The three steps of ``FlowerExchange._agree_salt``, played by hand as the server would."""
    from flwr.app import Context, RecordDict

    from fedit.collab.app.client_app import SECRET, make_client_app
    from fedit.collab.settings import CollabSettings

    app = make_client_app(CollabSettings(clients=3))
    nodes = [11, 12, 13]
    ctx = {n: Context(run_id=1, node_id=n, node_config={"partition-id": i}, state=RecordDict(), run_config={})
           for i, n in enumerate(nodes)}
    seen = []  # everything the server receives

    def ask(n, kind, values):
        reply = app(_message(kind, values, n), ctx[n])
        assert not reply.has_error(), reply.error
        cfg = dict(reply.content.config_records["collab"])
        seen.append(json.dumps(cfg, default=str))
        return cfg

    pub = {n: ask(n, "query.keys", {})["public"] for n in nodes}
    sealed = json.loads(ask(11, "query.seal", {"keys": json.dumps({str(n): pub[n] for n in nodes[1:]})})["sealed"])
    for n in nodes[1:]:
        assert ask(n, "query.open", {"from": pub[11], "sealed": sealed[str(n)]})["ok"]
    salts = {bytes(ctx[n].state[SECRET]["salt"]) for n in nodes}
    assert len(salts) == 1 and len(next(iter(salts))) == 32  # every client holds the same salt
    salt = next(iter(salts))
    assert not any(salt.hex() in s or salt.hex().upper() in s for s in seen)  # no reply carries it
    noise = {bytes(ctx[n].state[SECRET]["noise"]) for n in nodes}
    assert len(noise) == 3  # each client's DP noise seed is its own


def test_a_sealed_salt_opens_only_for_its_addressee_and_unchanged():
    a, b, c = new_key_pair(), new_key_pair(), new_key_pair()
    box = seal(a[0], b[1], b"s" * 32)
    assert open_sealed(b[0], a[1], box) == b"s" * 32
    with pytest.raises(SealError):  # another client (or the server with a key of its own)
        open_sealed(c[0], a[1], box)
    with pytest.raises(SealError):  # changed in transit
        open_sealed(b[0], a[1], box[:-1] + bytes([box[-1] ^ 1]))


def test_a_salt_in_the_run_config_is_refused():
    from fedit.collab.settings import CollabSettings
    from fedit.federation.settings import SettingsError

    with pytest.raises(SettingsError, match="visible to the server"):
        CollabSettings.from_user_config({"clients": 3, "salt": "00ff"})
    assert CollabSettings().secagg  # on by default
    with pytest.raises(SettingsError, match="2 to"):
        CollabSettings(clients=1)
    assert not CollabSettings(clients=1, secagg=False).secagg


# --- a client that drops out during SecAgg+ ----------------------------------------------------
def test_a_client_dropping_out_of_secagg_leaves_the_round_to_the_rest(tiny_model_dir, tmp_path, monkeypatch):
    """c1 fails at SecAgg+'s collect stage (after the key setup, before its masked vector): the
    round completes, the merged edit is the one of c0's and c2's facts alone, the report names c1."""
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    from fedit import hparams_for
    from fedit.collab import CollabConfig, split_plan
    from fedit.collab.app.simulation import run_flower
    from fedit.collab.reference import global_reference
    from fedit.collab.settings import CollabSettings
    from fedit.data.loaders import load_records
    from fedit.methods import Resources
    from fedit.models.loading import load_model

    torch.set_num_threads(1)
    lm = load_model(str(tiny_model_dir))
    res = Resources(cache_dir=str(tmp_path / "cache"), corpus=str(CORPUS))
    hp = hparams_for("memit", lm, HP)
    plan = split_plan(load_records("counterfact", None, 6), 3, 1, 2)
    s = CollabSettings(model=str(tiny_model_dir), cache_dir=str(tmp_path / "cache"), corpus=str(CORPUS), threads=1,
                       overrides=json.dumps(HP), clients=3, per_client=2)
    cfg = CollabConfig(reference=False, layerwise_reference=False)
    report = run_flower(s, cfg, lm, plan, hp, res, node_configs={1: {"drop-at": "collect_masked_vectors@1"}})
    assert report["dropped_out"] == {"1": ["c1"]}
    (sa,) = report["secure_aggregation"]
    assert sa["summed"] == ["c0", "c2"] and sa["dropped"] == ["c1"] and sa["clients"] == 2
    r1 = report["runs"]["collabedit"]["rounds"][0]
    assert r1["edited"] == 4 and r1["metrics"]["n"] == 4  # c1's facts are neither edited nor evaluated
    # The merged Δ equals global MEMIT over the facts of c0 and c2 (computed here, from scratch)...
    rest = global_reference(lm, {c: plan[c] for c in ("c0", "c2")}, hp, res, cfg)["deltas"][0]
    every = global_reference(lm, plan, hp, res, cfg)["deltas"][0]
    got = {int(l): n for l, n in r1["delta_norm"].items()}
    for l, d in rest.items():
        assert abs(got[l] - float(d.norm())) < 1e-4 * float(d.norm()), (l, got[l], float(d.norm()))
        # ...and not the edit that includes c1's facts.
        assert abs(got[l] - float(every[l].norm())) > 1e-2 * float(every[l].norm())


# --- differential privacy of the sums ----------------------------------------------------------
def _vectors(n=50, d_in=40, d_out=30, layers=(1, 2), scale=5.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return EditVectors(torch.zeros(n, 4), {l: scale * torch.randn(n, d_in, generator=g, dtype=torch.float64) for l in layers},
                       {l: scale * torch.randn(n, d_out, generator=g, dtype=torch.float64) for l in layers})


def test_clipping_bounds_every_facts_contribution():
    cfg = DPConfig(noise=1.0, clip_key=3.0, clip_resid=0.5)
    vec, counts = clipped(_vectors(), cfg)
    for l in vec.layers:
        assert float(vec.keys[l].norm(dim=1).max()) <= 3.0 + 1e-12
        assert float(vec.resids[l].norm(dim=1).max()) <= 0.5 + 1e-12
        one = LayerSums.of(vec.keys[l][:1], vec.resids[l][:1])  # one fact's share of the sums
        assert float(one.RK.norm()) <= 1.5 + 1e-12 and float(one.KK.norm()) <= 9.0 + 1e-12
    assert counts == {"keys": 100, "resids": 100}  # norms ~ 5·√40 and 5·√30: every row clipped
    small, counts = clipped(_vectors(scale=1e-3), cfg)
    assert counts == {"keys": 0, "resids": 0} and torch.equal(small.keys[1], _vectors(scale=1e-3).keys[1])


def test_noise_has_the_stated_scale_and_is_the_same_for_the_same_question():
    cfg = DPConfig(noise=2.0, clip_key=3.0, clip_resid=0.5, contributors=4)
    s_rk, s_kk = cfg.sigmas()
    assert math.isclose(s_rk, 2.0 * 1.5 / 2) and math.isclose(s_kk, 2.0 * 9.0 / 2)
    vec = _vectors(d_in=200, d_out=150)
    exact = layer_sums(clipped(vec, cfg)[0])
    shapes = {1: (150, 200), 2: (150, 200)}
    a = release(vec, [1, 2], shapes, cfg, b"seed", "v/0")
    assert torch.equal(a[1].RK, release(vec, [1, 2], shapes, cfg, b"seed", "v/0")[1].RK)  # no fresh sample
    assert not torch.equal(a[1].RK, release(vec, [1, 2], shapes, cfg, b"seed", "w/0")[1].RK)
    n_rk = (a[1].RK - exact[1].RK).std().item()
    n_kk = (a[1].KK - exact[1].KK).triu().flatten()[torch.triu_indices(200, 200).T[:, 0] * 200
                                                       + torch.triu_indices(200, 200).T[:, 1]].std().item()
    assert abs(n_rk / s_rk - 1) < 0.02 and abs(n_kk / s_kk - 1) < 0.02  # 30,000 and 20,100 draws
    assert torch.equal(a[1].KK, a[1].KK.T)
    alone = release(None, [1], {1: (150, 200)}, cfg, b"seed", "v/0")  # no facts: noise, not zeros
    assert alone[1].n == 0 and float(alone[1].RK.abs().max()) > 0


def test_epsilon_is_that_of_the_gaussian_mechanism():
    for mu in (0.1, 1.0, 3.0, 30.0, 100.0):  # large μ: e^ε overflows unless kept in log space
        eps = epsilon(mu, 1e-5)
        assert abs(gdp_delta(mu, eps) - 1e-5) < 1e-9
    # The classical bound σ ≥ Δ·√(2 ln(1.25/δ))/ε (for ε < 1) is looser than the analytic one.
    mu = 0.2
    classic = mu * math.sqrt(2 * math.log(1.25 / 1e-5))
    assert epsilon(mu, 1e-5) < classic < 1
    acc = accounting(DPConfig(noise=4.0, clip_key=1.0, clip_resid=1.0), layers=4)
    assert math.isclose(acc["mu"], math.sqrt(8) / 4) and acc["epsilon"] == epsilon(math.sqrt(8) / 4, 1e-5)
    with pytest.raises(PrivacyError):
        DPConfig(noise=0.0, clip_key=1.0, clip_resid=1.0)
    with pytest.raises(PrivacyError):
        DPConfig(noise=1.0, clip_key=1.0, clip_resid=1.0, delta=1.0)
    assert noisy({}, DPConfig(1.0, 1.0, 1.0), b"s", "x") == {}


def test_cli_dp_run_reports_its_guarantee_and_moves_away_from_the_exact_edit(tiny_model_dir, tmp_path, capsys):
    from fedit.cli.main import main

    from helpers import run_json

    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({k: v for k, v in HP.items() if k != "layers"}))
    argv = ["collab", "run", "--model", str(tiny_model_dir), "--hparams", str(hp), "--layers", "1,2", "--corpus",
            str(CORPUS), "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--json", "--engine", "local",
            "--clients", "2", "--per-client", "2", "--no-layerwise-reference"]
    code, out = run_json(capsys, main, [*argv, "--merge", "all", "--dp-noise", "1", "--out", str(tmp_path / "x")])
    assert code == 2 and "CollabEdit's sums" in out["error"] and not (tmp_path / "x").exists()
    code, out = run_json(capsys, main, [*argv, "--dp-noise", "0.5", "--dp-clip-key", "5", "--dp-clip-resid", "1",
                                        "--out", str(tmp_path / "dp")])
    assert code == 0
    p = out["privacy"]
    assert p["contributors"] == 2 and math.isclose(p["mu"], 4.0) and p["epsilon"] == epsilon(4.0, 1e-5)
    assert out["vs_reference"]["collabedit"]["relative"] > 1e-3  # noise and clipping moved the edit
    assert "Differential privacy of the sums" in (tmp_path / "dp" / "report.md").read_text()


def test_the_round_loop_leaves_a_dropped_clients_facts_unapplied():
    """What ``rounds.run_round`` does with the clients an exchange reports as dropped out of the
    secure sum: the merge uses the sum it got, their facts are neither applied nor remembered."""
    from fedit.collab import CollabConfig, CollabState, FactDigest
    from fedit.collab.rounds import Edited, Solver, run_round

    g = torch.Generator().manual_seed(0)
    K = {c: torch.randn(2, 5, generator=g, dtype=torch.float64) for c in ("c0", "c1")}
    R = {c: torch.randn(2, 3, generator=g, dtype=torch.float64) for c in ("c0", "c1")}

    class OneDrops:
        def digests(self, rnd):
            return {c: [FactDigest(f"{c}k{i}", f"{c}t{i}") for i in range(2)] for c in ("c0", "c1")}

        def prepare(self, rnd, keep, state):
            return {c: Edited([0, 1], []) for c in keep}

        def summed_stats(self, rnd, keep, state):  # c1's vector never arrived
            return {7: LayerSums.of(K["c0"], R["c0"])}

        def dropped(self, rnd):
            return ["c1"]

        def evaluate(self, rnd, state, applied):
            self.applied = applied
            return {"c0": {}, "c1": {}}

    ex, st = OneDrops(), CollabState()
    solver = Solver({7: torch.eye(5, dtype=torch.float64)}, 2.0, [7])
    entry, _ = run_round(0, "collabedit", ex, st, {}, CollabConfig(), solver)
    want = R["c0"].T @ K["c0"] @ torch.linalg.inv(2.0 * torch.eye(5, dtype=torch.float64) + K["c0"].T @ K["c0"])
    assert torch.allclose(st.delta[7], want, atol=1e-12)  # c0's facts alone
    assert ex.applied == {"c0": {0: [0, 1]}, "c1": {0: []}}
    assert sorted(st.applied) == ["c0k0", "c0k1"]  # c1 may send its facts again next round
    assert entry["edited"] == 2 and entry["clients"]["c1"]["dropped"] and "dropped" not in entry["clients"]["c0"]
