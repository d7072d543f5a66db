"""CollabEdit in deployment on loopback (a SuperLink with TLS and SuperNode authentication, one
registered SuperNode per client, `flwr run`), its sums through SecAgg+; and one source of defaults
for the apps, the settings and the CLI."""

import json
import tomllib

import pytest

from fedit import Resources, hparams_for
from fedit.collab import CollabConfig, run_collab
from fedit.collab.settings import CollabSettings, client_facts
from fedit.federation.settings import FedSettings
from fedit.models.loading import load_model

from helpers import CORPUS, FAST
from loopback import SRC, deployment

APP = SRC / "collab" / "app"
HP = {**FAST, "v_lr": 1.0, "clamp_norm_factor": 8.0, "mom2_update_weight": 10.0, "layers": [1, 2]}
SALT = "5eed" * 8


@pytest.mark.parametrize("folder, settings", [(SRC / "federation" / "app", FedSettings),
                                              (SRC / "collab" / "app", CollabSettings)])
def test_app_run_config_is_the_settings_defaults(folder, settings):
    cfg = tomllib.loads((folder / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert cfg == settings().to_user_config()


def _cli_defaults(argv):
    from fedit.cli.main import build_parser

    return vars(build_parser().parse_args(argv))


@pytest.mark.parametrize("argv, settings, names", [
    (["fed", "run", "--out", "x"], FedSettings,
     {"clients": "clients", "rounds": "slots", "dataset": "dataset", "tau": "tau",
      "mode": "mode", "match": "match", "method": "method", "seed": "seed"}),
    (["collab", "run", "--out", "x"], CollabSettings,
     {"clients": "clients", "rounds": "rounds", "dataset": "dataset", "merge": "merge",
      "conflict_policy": "conflict_policy", "ties_density": "ties_density", "ties_scale": "ties_scale",
      "c1_weight": "c1_weight", "residual_tol": "residual_tol", "overlap": "overlap", "conflict": "conflict",
      "seed": "seed", "form": "form"}),
])
def test_cli_defaults_are_the_settings_defaults(argv, settings, names):
    args = _cli_defaults(argv)
    want = settings()
    assert {a: args[a] for a in names} == {a: getattr(want, f) for a, f in names.items()}
    # records per client: not given on the command line, so the settings' default applies
    from argparse import Namespace

    from fedit.cli import collab, common

    ns = Namespace(**args)
    if settings is CollabSettings:
        assert collab.per_round(ns) == want.per_client
    else:
        assert common.records_per_client(ns, FedSettings.n_per_client) == want.n_per_client


def run_config(s: CollabSettings) -> str:
    """``s`` as `flwr run --run-config` text (the salt stays with the nodes)."""
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
                    for k, v in s.to_user_config().items() if k != "salt")


def test_collabedit_on_superlink_and_supernodes_with_secagg(tmp_path, tiny_model_dir):
    (tmp_path / "model").symlink_to(tiny_model_dir)
    (tmp_path / "hp.json").write_text(json.dumps(HP))
    out = tmp_path / "out"
    s = CollabSettings(model=str(tmp_path / "model"), hparams_file=str(tmp_path / "hp.json"), corpus=str(CORPUS),
                       cache_dir=str(tmp_path / "cache"), clients=2, per_client=2, secagg=True, threads=1,
                       out=str(out))
    cfg = run_config(s)
    with deployment(tmp_path, [f"partition-id={i} salt='{SALT}'" for i in range(2)]) as run:
        done = run(APP, cfg)
        assert done.returncode == 0, done.stdout + done.stderr
    # `flwr run` can exit 0 on a failed run: the outcome is what the ServerApp wrote.
    assert not (out / "collab.error.json").exists(), (out / "collab.error.json").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["engine"] == "flower" and report["clients"] == ["c0", "c1"]
    assert [a["clients"] for a in report["secure_aggregation"]] == [2]
    deployed = report["runs"]["collabedit"]["rounds"][0]
    assert deployed["edited"] == 4 and (out / "report.md").exists() and (out / "chart.png").exists()
    # The same facts in one process: the deployed merge (from masked sums) is the same edit.
    lm = load_model(str(tmp_path / "model"))
    plan = dict(client_facts(s, i) for i in range(2))
    hp = hparams_for("memit", lm, None, str(tmp_path / "hp.json"))
    local = run_collab(lm, plan, hp, Resources(cache_dir=str(tmp_path / "cache"), corpus=str(CORPUS)),
                       CollabConfig(salt=bytes.fromhex(SALT), reference=False))["runs"]["collabedit"]["rounds"][0]
    for l, norm in local["delta_norm"].items():
        assert deployed["delta_norm"][l] == pytest.approx(norm, rel=1e-4)
    assert deployed["metrics"]["efficacy_success"] == pytest.approx(local["metrics"]["efficacy_success"], abs=1e-6)
