"""The layer-sequential form (`form=layerwise`) on a real Flower deployment on loopback: a
SuperLink, one SuperNode per client, `flwr run`; one exchange of messages per edited layer, each
layer's statistics summed through SecAgg+. The merged edit the ServerApp writes is the one the
in-process engine merges from the same facts."""

import json

from fedit import Resources, hparams_for
from fedit.collab import CollabConfig
from fedit.collab.settings import CollabSettings, client_facts
from fedit.deltas import WeightDeltas
from fedit.models.loading import load_model

from collab_local import max_relative, run_local
from helpers import CORPUS, FAST
from loopback import SRC, deployment

HP = {**FAST, "v_lr": 1.0, "clamp_norm_factor": 8.0, "mom2_update_weight": 10.0, "layers": [1, 2],
      "backtrack_steps": 0}
SALT = "1a7e" * 8


def _run_config(s: CollabSettings) -> str:
    """``--run-config`` text for ``flwr run``: every setting but the salt (the nodes hold it)."""
    def value(v):
        return json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)

    return " ".join(f"{k}={value(v)}" for k, v in s.to_user_config().items() if k != "salt")


def test_layerwise_collabedit_on_superlink_and_supernodes_with_secagg(tmp_path, tiny_model_dir):
    (tmp_path / "model").symlink_to(tiny_model_dir)
    (tmp_path / "hp.json").write_text(json.dumps(HP))
    out = tmp_path / "out"
    s = CollabSettings(model=str(tmp_path / "model"), hparams_file=str(tmp_path / "hp.json"), corpus=str(CORPUS),
                       cache_dir=str(tmp_path / "cache"), clients=2, per_client=2, form="layerwise", secagg=True,
                       threads=1, out=str(out))
    with deployment(tmp_path, [f"partition-id={i} salt='{SALT}'" for i in range(2)]) as run:
        done = run(SRC / "collab" / "app", _run_config(s))
        assert done.returncode == 0, done.stdout + done.stderr
    # `flwr run` can exit 0 on a failed run: the outcome is what the ServerApp wrote.
    assert not (out / "collab.error.json").exists(), (out / "collab.error.json").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["form"] == "layerwise" and report["runs"]["collabedit"]["rounds"][0]["edited"] == 4
    # the salt agreement once, then one secure sum per edited layer, and one query exchange per layer before it
    assert [(a["round"], a["layer"], a["clients"]) for a in report["secure_aggregation"]] == [(1, 1, 2), (1, 2, 2)]
    ex = [(e["exchange"], e["step"]) for e in report["traffic"]["exchanges"]]
    assert ex == [("keys", None), ("seal", None), ("open", None), ("digest", None), ("prepare", None), ("layer", 0), ("secagg", 0), ("layer", 1), ("secagg", 1),
                  ("evaluate", None)]
    # The same facts in one process: the deployed merge (from masked sums, per layer) is the same edit.
    lm = load_model(str(tmp_path / "model"))
    deployed = WeightDeltas.load(out / "collabedit.safetensors").deltas
    deployed = {l: lm.adapter.to_param_layout(deployed[lm.adapter.w_out_param_name(l)].double()) for l in HP["layers"]}
    plan = dict(client_facts(s, i) for i in range(2))
    hp = hparams_for("memit", lm, None, str(tmp_path / "hp.json"))
    _, local, _, _ = run_local(lm, plan, hp, Resources(cache_dir=str(tmp_path / "cache"), corpus=str(CORPUS)),
                               CollabConfig(salt=bytes.fromhex(SALT), form="layerwise", reference=False),
                               reference=False)
    assert max_relative(deployed, local["deltas"]["collabedit"][0]) < 1e-5
