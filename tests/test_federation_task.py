"""FedEdit's node-side work (``federation.app.task``) without Flower: whatever fails half-way, the
process's cached model is back at its base weights afterwards."""

import json

import pytest
import torch

from fedit.federation.app import task
from fedit.federation.settings import FedSettings
from fedit.testing import tiny_model

from helpers import CORPUS, FAST

OVER = {**FAST, "v_lr": 1.0, "v_num_grad_steps": 10, "clamp_norm_factor": 8.0, "layers": [1, 2],
        "mom2_update_weight": 10.0}
NODE = {"partition-id": 0, "num-partitions": 2}


def _weights(lm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def _unchanged(lm, before) -> bool:
    return all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())


def _boom(*a, **k):
    raise RuntimeError("boom")


@pytest.fixture
def edited(tiny_cache):
    """A tiny model, its base weights, the settings and a client's saved state after one slot."""
    lm = tiny_model("gpt2")
    base = _weights(lm)
    s = FedSettings(model="tiny", corpus=str(CORPUS), cache_dir=str(tiny_cache), overrides=json.dumps(OVER),
                    clients=2, n_per_client=2, slots=1)
    with task.client_session(s, NODE, None, lm=lm) as (client, records):
        client.local_edit(0, [r.request for r in records], [str(r.case_id) for r in records])
        assert not _unchanged(lm, base)  # the client's edit is on the model inside the session
        saved = client.state()
    assert _unchanged(lm, base)
    return lm, base, s, saved


def test_a_failure_inside_a_session_reverts_the_clients_edit(edited):
    lm, base, s, saved = edited
    with pytest.raises(RuntimeError, match="boom"):
        with task.client_session(s, NODE, saved, lm=lm) as (client, _):
            assert client.applied and not _unchanged(lm, base)
            _boom()
    assert _unchanged(lm, base)


def test_a_failing_fedavg_step_leaves_no_global_update(edited, monkeypatch):
    lm, base, s, saved = edited
    name = lm.adapter.w_out_param_name(1)
    glob = {name: torch.full_like(base[name], 0.01)}
    monkeypatch.setattr(task, "fedavg_update", _boom)
    with pytest.raises(RuntimeError, match="boom"):
        with task.client_session(s, NODE, saved, lm=lm) as (client, records):
            task.fedavg_step(client, glob, records, "memit")
    assert _unchanged(lm, base)


def test_a_failing_measurement_leaves_no_edit(edited, monkeypatch):
    lm, base, s, saved = edited
    import fedit.evaluate.runner as runner

    calls = []
    real = runner.measure

    def measure_then_fail(lm_, records, **kw):  # the unedited model measures, the edited one fails
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("boom")
        return real(lm_, records, **kw)

    monkeypatch.setattr(runner, "measure", measure_then_fail)
    name = lm.adapter.w_out_param_name(2)
    for glob in (None, {name: torch.full_like(base[name], 0.01)}):
        calls.clear()
        with pytest.raises(RuntimeError, match="boom"):
            with task.client_session(s, NODE, saved, lm=lm) as (client, records):
                task.evaluate_step(client, records, s.dataset, glob)
        assert _unchanged(lm, base)


def test_evaluate_step_measures_the_clients_edit_per_record_only_when_asked(edited):
    lm, base, s, saved = edited
    with task.client_session(s, NODE, saved, lm=lm) as (client, records):
        out = task.evaluate_step(client, records, s.dataset)
    assert "per_record" not in out  # aggregates only, unless the node opts in
    with task.client_session(s, NODE, saved, lm=lm) as (client, records):
        opted = task.evaluate_step(client, records, s.dataset, facts=["t0", "t1"])
    assert _unchanged(lm, base)
    assert out["post"]["efficacy_success"] >= out["pre"]["efficacy_success"]
    assert [r["fact"] for r in opted["per_record"]] == ["t0", "t1"] and opted["post"] == out["post"]
    assert "case_id" not in str(opted)
