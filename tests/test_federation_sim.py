"""FedEdit on Flower's simulation engine, through `fedit fed run`, on a tiny model."""

import json

import pytest

from fedit.cli.main import main
from fedit.federation.settings import FedSettings, SettingsError

from helpers import CORPUS, run_json

HP = {"mom2_samples": 40, "mom2_seq_len": 32, "v_num_grad_steps": 10, "context_template_length_params": [[4, 5]],
      "layers": [1, 2], "mom2_update_weight": 10.0, "v_lr": 1.0, "clamp_norm_factor": 8.0}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("fed")
    (d / "model").symlink_to(tiny_model_dir)
    (d / "hp.json").write_text(json.dumps(HP))
    return d


def _run(capsys, d, *extra):
    argv = ["fed", "run", "--model", str(d / "model"), "--hparams", str(d / "hp.json"), "--corpus", str(CORPUS),
            "--cache-dir", str(d / "cache"), "--threads", "1", "--json", *extra]
    return run_json(capsys, main, argv)


def test_private_federation_with_reuse_and_fedavg(setup, capsys):
    out = setup / "private"
    # tau = -1: every other client's MKV is a hit, so reuse must happen.
    code, r = _run(capsys, setup, "--clients", "3", "--slots", "2", "--n-per-client", "4", "--tau", "-1",
                   "--baseline", "fedavg", "--out", str(out))
    assert code == 0, r
    assert r["clients"] == 3 and r["mode"] == "private" and r["n"] == 12
    assert set(r["metrics"]) == {"efficacy_success", "paraphrase_success", "neighborhood_success", "score"}
    assert r["reuse"]["mkvs_uploaded"] == 12
    # every client reuses the other two clients' MKVs of each slot: 3 clients × 8 facts
    assert r["reuse"]["mkvs_reused"] == 24 and r["reuse"]["mkv_computations_saved"] == 24
    assert r["reuse"]["hits_possible"] == 24 and r["reuse"]["hit_rate"] == 1.0
    assert all(c["own"] == 4 and c["reused"] == 8 for c in r["per_client"].values())
    assert r["centralised"] is not None and r["retention"] is not None and r["fedavg"] is not None
    report = json.loads((out / "report.json").read_text())
    assert report["centralised"]["zs_reused"] == 12  # the reference reused every stored z
    md = (out / "report.md").read_text()
    assert md.startswith("# FedEdit (private mode)") and "Hit rate 100.0% of 24 possible" in md
    assert "did not tell the facts apart" in md and "--match delta" in md  # the rule shared everything
    assert (out / "chart.png").stat().st_size > 1000 and (out / "mkv.sqlite").exists()
    # the report can be rebuilt from federation.json alone (what a deployment's ServerApp leaves)
    assert main(["fed", "report", "--out", str(out), "--no-reference", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["reuse"] == r["reuse"] and again["metrics"] == r["metrics"] and again["centralised"] is None
    assert main(["fed", "report", "--out", str(setup / "nowhere"), "--json"]) == 2
    assert "does not exist" in json.loads(capsys.readouterr().out)["error"]
    from fedit.federation.store import MKVStore

    with MKVStore(out / "mkv.sqlite") as st:  # private mode: no request text on the server
        assert st.count() == 12
        assert all("request" not in m.meta and "key.1" in m.payload for m in st.for_slot(0))


def test_paper_mode_shares_requests_only_when_opted_in(setup, capsys):
    with pytest.raises(SettingsError, match="opted in"):
        FedSettings(mode="paper")
    code, r = _run(capsys, setup, "--clients", "2", "--slots", "1", "--n-per-client", "2", "--tau", "-1",
                   "--mode", "paper", "--share-requests", "--no-reference", "--out", str(setup / "paper"))
    assert code == 0, r
    assert r["reuse"]["mkvs_reused"] == 4 and r["reuse"]["hits_unusable"] == 0


def test_failed_run_exits_non_zero_with_the_reason(setup, capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"bogus_key": 1}))
    code, r = _run(capsys, setup, "--clients", "2", "--slots", "1", "--n-per-client", "2", "--hparams", str(bad),
                   "--out", str(tmp_path / "o"))
    assert code == 2 and "bogus_key" in r["error"]
    code, r = _run(capsys, setup, "--clients", "2", "--n-per-client", "999", "--out", str(tmp_path / "o2"))
    assert code == 2 and "fewer than n-per-client" in r["error"]
    code, r = _run(capsys, setup, "--clients", "2", "--n-per-client", "2", "--slots", "1", "--out", str(setup / "private"))
    assert code == 2 and "already exists" in r["error"]


def test_report_counts_possible_hits_per_slot_and_says_when_none_was_a_hit():
    from fedit.federation.report import _possible_hits, markdown

    # 3 clients in a slot with 2, 1 and 0 own MKVs: the first compares with 1, the second with 2
    assert _possible_hits({"a": 2, "b": 1, "c": 0}) == 3
    r = {"settings": {"dataset": "counterfact", "model": "m", "n-per-client": 2, "slots": 1, "partition": "relation",
                      "method": "memit", "match": "delta"}, "mode": "private", "tau": 0.4, "seconds": 1.0,
         "clients": ["a", "b"], "headline": ["score"], "fededit": {"pre": {"score": 0.2}, "post": {"score": 0.5}},
         "per_client": {}, "reuse": {"mkvs_uploaded": 4, "mkvs_reused": 0, "hits_unusable": 0, "hits_possible": 4,
                                     "hit_rate": 0.0, "seconds_per_mkv": 1.0, "seconds_saved_estimate": 0.0}}
    assert "None of the 4 possible hits was a hit (rule on delta" in markdown(r)
