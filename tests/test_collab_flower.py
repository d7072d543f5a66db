"""CollabEdit through the CLI: in-process, and as Flower apps in the simulation engine with SecAgg+."""

import json
import os

import numpy as np
import pytest
import torch

from fedit.cli.main import main
from fedit.collab.secure import CLIP, LEVELS, MODULUS, decode, encode, exponents
from fedit.methods.vectors import LayerSums

from helpers import run_json, CORPUS, FAST

HP = {**FAST, "v_lr": 1.0, "clamp_norm_factor": 8.0, "mom2_update_weight": 10.0}


@pytest.fixture
def model_dir(tiny_model_dir):
    return tiny_model_dir


def _run(capsys, argv):
    return run_json(capsys, main, argv)


def _argv(model_dir, tmp_path, *extra):
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps(HP))
    return ["collab", "run", "--model", str(model_dir), "--hparams", str(hp), "--layers", "1,2", "--corpus", str(CORPUS),
            "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--json", *extra]


def test_secagg_quantiser_is_exact_on_integer_limbs():
    """Flower's own SecAgg+ arithmetic (quantise, mask, sum mod 2³², dequantise) on our limbs."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    g = torch.Generator().manual_seed(0)
    shapes = {1: (3, 5)}
    parts = []
    for s in (1e4, 1e-3, 3.0):
        K, R = torch.randn(4, 5, generator=g, dtype=torch.float64) * s, torch.randn(4, 3, generator=g, dtype=torch.float64)
        parts.append({1: LayerSums(R.T @ K, K.T @ K, 4)})
    ex = [exponents(p, [1], shapes) for p in parts]
    exps = {n: max(e[n] for e in ex) for n in ex[0]}
    rng = np.random.default_rng(0)
    masked = None
    for p in parts:
        q = quantize(encode(p, [1], shapes, exps), CLIP, LEVELS)
        q = [(a.astype(np.int64) + rng.integers(0, MODULUS, a.shape)) % MODULUS for a in q]  # a mask...
        masked = q if masked is None else [(x + y) for x, y in zip(masked, q)]
    rng = np.random.default_rng(0)
    for p in parts:  # ...that the unmasking removes again
        masked = [x - rng.integers(0, MODULUS, x.shape) for x in masked]
    summed = [(m % MODULUS) for m in masked]
    deq = dequantize(summed, CLIP, LEVELS)
    sums = [np.round(a - (len(parts) - 1) * CLIP) for a in deq]  # the workflow's offset
    got = decode(sums, [1], shapes, exps, 12)[1]
    RK = sum(p[1].RK for p in parts)
    KK = sum(p[1].KK for p in parts)
    assert torch.allclose(got.RK, RK, rtol=0, atol=1e-15 * float(RK.abs().max()))
    assert torch.allclose(got.KK, KK, rtol=0, atol=1e-15 * float(KK.abs().max()))


def test_cli_local_engine_all_merges(model_dir, tmp_path, capsys):
    code, out = _run(capsys, _argv(model_dir, tmp_path, "--engine", "local", "--clients", "2", "--rounds", "1",
                                   "--per-client", "4", "--overlap", "0.25", "--conflict", "0.25", "--merge", "all",
                                   "--conflict-policy", "priority", "--priority", "c1", "--out", str(tmp_path / "o")))
    assert code == 0 and out["engine"] == "local"
    assert set(out["final"]) == {"collabedit", "task-arithmetic", "average", "ties", "fedavg"}
    assert out["duplicates"] == 2 and out["conflicts"] == 2 and out["rejected"] == 2
    assert out["vs_reference"]["collabedit"]["relative"] < 1e-9
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    (c,) = [c for c in report["resolution"][0]["conflicts"] if c["kept"][0] == "c1"][:1]
    assert c["resolution"] == "priority: kept the target of c1"
    md = (tmp_path / "o" / "report.md").read_text()
    assert "global MEMIT, base form (reference)" in md and "## Duplicates and conflicts" in md
    assert (tmp_path / "o" / "chart.png").stat().st_size > 1000


def test_cli_errors_are_json(model_dir, tmp_path, capsys):
    code, out = _run(capsys, _argv(model_dir, tmp_path, "--merge", "sum", "--out", str(tmp_path / "o")))
    assert code == 2 and "unknown merge" in out["error"]
    code, out = _run(capsys, _argv(model_dir, tmp_path, "--engine", "local", "--secagg", "--out", str(tmp_path / "o")))
    assert code == 2 and "Flower engine" in out["error"]
    code, out = _run(capsys, _argv(model_dir, tmp_path, "--clients", "1", "--out", str(tmp_path / "o")))
    assert code == 2 and "SecAgg+ needs 2" in out["error"] and "--no-secagg" in out["error"]
    code, out = _run(capsys, _argv(model_dir, tmp_path, "--clients", "2", "--per-client", "400",
                                   "--out", str(tmp_path / "o")))
    assert code == 2 and "distinct records" in out["error"]


def test_cli_flower_simulation_with_secagg(model_dir, tmp_path, capsys, monkeypatch):
    """Two merge methods, two rounds, three client nodes, CollabEdit's sums through SecAgg+ (the
    default: no --secagg given)."""
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    code, out = _run(capsys, _argv(model_dir, tmp_path, "--clients", "3", "--rounds", "2", "--per-client", "3",
                                   "--overlap", "0.34", "--merge", "collabedit,task-arithmetic",
                                   "--no-layerwise-reference", "--out", str(tmp_path / "fl")))
    assert code == 0 and out["engine"] == "flower" and out["secagg"]
    assert out["duplicates"] == 6 and out["conflicts"] == 0
    report = json.loads((tmp_path / "fl" / "report.json").read_text())
    assert report["clients"] == ["c0", "c1", "c2"]
    sa = report["secure_aggregation"]
    assert [s["round"] for s in sa] == [1, 2] and all(s["clients"] == 3 and not s["dropped"] for s in sa)
    assert out["dropped_out"] == {} and out["privacy"] is None
    # Merged in the server from masked sums, the edit is global MEMIT over the union computed
    # elsewhere (this process): equal up to the noise of optimising the targets twice.
    assert report["runs"]["collabedit"]["rounds"][0]["vs_reference"]["relative"] < 1e-4
    assert report["runs"]["task-arithmetic"]["rounds"][0]["vs_reference"]["relative"] > 1e-2
    r2 = report["runs"]["collabedit"]["rounds"][1]
    assert r2["edited"] == 6 and r2["metrics"]["n"] == 12 and set(r2["by_round"]) == {"1", "2"}
    assert os.path.exists(tmp_path / "fl" / "chart.png")
