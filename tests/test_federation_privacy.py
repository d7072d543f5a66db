"""Consent and privacy on FedEdit's nodes, through Flower's simulation engine on a tiny model:
plaintext only with the node's own consent, opaque fact tokens on the wire, aggregates only at
evaluation, errors without request text, result files readable by their owner only."""

import json
import os
import re
import stat

import pytest

from fedit.federation.fededit import FedError
from fedit.federation.settings import FedSettings

from helpers import CORPUS

pytest.importorskip("flwr")

HP = {"mom2_samples": 40, "mom2_seq_len": 32, "v_num_grad_steps": 10, "context_template_length_params": [[4, 5]],
      "layers": [1, 2], "mom2_update_weight": 10.0, "v_lr": 1.0, "clamp_norm_factor": 8.0}


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("fedpriv")
    (d / "hp.json").write_text(json.dumps(HP))
    return d, dict(model=str(tiny_model_dir), hparams_file=str(d / "hp.json"), corpus=str(CORPUS),
                   cache_dir=str(d / "cache"), threads=1, clients=2, slots=1, n_per_client=2, tau=-1.0)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_paper_mode_needs_each_nodes_own_consent_not_the_run_config(base):
    from fedit.federation.app.simulation import run_federation

    d, kw = base
    s = FedSettings(**kw, mode="paper", share_requests=True, out=str(d / "paper"))  # the run asks for plaintext
    with pytest.raises(FedError, match="has not agreed to send its requests in plaintext") as e:
        run_federation(s)  # ...but no node said yes in its own node config
    assert "share-requests=true" in str(e.value) and "--node-config" in str(e.value)
    err = d / "paper" / "federation.error.json"
    assert "ConsentError" in json.loads(err.read_text())["error"] and _mode(err) == 0o600
    assert not (d / "paper" / "federation.json").exists()


def test_private_run_sends_tokens_not_case_ids_and_aggregates_only(base):
    from fedit.federation.simulate import run
    from fedit.federation.store import MKVStore
    from fedit.federation.settings import client_records

    d, kw = base
    s = FedSettings(**kw, out=str(d / "private"))
    old = os.umask(0o022)  # a permissive umask: the files must still be private
    try:
        report = run(s)
    finally:
        os.umask(old)
    fed = json.loads((d / "private" / "federation.json").read_text())
    case_ids = {str(r.case_id) for i in range(2) for r in client_records(s, i, 2)}
    assert "case_ids" not in fed and not any(c in json.dumps(fed["slots"]) for c in case_ids)
    with MKVStore(s.store_path) as store:
        facts = [m.meta["fact"] for m in store.for_slot(0)]
    assert len(facts) == 4 and all(re.fullmatch("[0-9a-f]{16}", f) for f in facts)
    assert not set(facts) & case_ids
    assert all("per_record" not in ev and "pre" in ev for ev in fed["fededit"].values())  # aggregates only
    assert fed["slots"][0]["rejected"] == [] and report["rejected"] == []
    assert report["centralised"]["zs_reused"] == 4  # the simulation's own key maps tokens back to records
    store_files = [p for p in (d / "private").iterdir() if p.name.startswith("mkv.sqlite")]
    for p in [*store_files, d / "private" / "federation.json"]:
        assert _mode(p) == 0o600, p


def test_a_clients_error_reaches_the_server_without_request_text(base):
    from fedit.data.loaders import sample_path
    from fedit.federation.app.simulation import run_federation

    d, kw = base
    records = json.loads(sample_path("counterfact").read_text())[:4]
    for r in records:  # a subject made only of a special token: MEMIT refuses it, quoting the subject
        r["requested_rewrite"]["subject"] = "<|endoftext|>"
    (d / "bad.json").write_text(json.dumps(records))
    s = FedSettings(**{**kw, "tau": 0.4}, data=str(d / "bad.json"), partition="iid", out=str(d / "err"))
    with pytest.raises(FedError) as e:
        run_federation(s)
    saved = (d / "err" / "federation.error.json").read_text()
    for text in (str(e.value), saved):
        assert "RequestError" in text and "stays in that client's log" in text
        assert "endoftext" not in text and "tokenises" not in text
        assert not any(f"request {r['case_id']}" in text for r in records)
