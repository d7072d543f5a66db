"""A client whose node is killed mid-step, on a loopback deployment (TLS, node authentication,
SuperNodes as separate processes): the run completes with the others, the report says who was
missing where, and the client catches up afterwards.

The kill lands mid-step deterministically: the test's copy of the app (``loopback.held_app``)
makes the chosen node's ClientApp write a file when the chosen message arrives and wait; the
test kills that node's process group (SuperNode and ClientApp) once the file exists. The
SuperLink answers for the dead node with a node-unavailable error once it has missed its
heartbeats (up to a minute in Flower 1.41), which the server records as an absence."""

import json

from helpers import CORPUS
from loopback import SRC, deployment, held_app, wait_for
from test_federation_deploy import HP

FED = SRC / "federation" / "app"


def test_fededit_client_killed_mid_slot_is_missing_and_catches_up(tmp_path, tiny_model_dir):
    (tmp_path / "model").symlink_to(tiny_model_dir)
    (tmp_path / "hp.json").write_text(json.dumps(HP))
    out, held = tmp_path / "out", tmp_path / "held"
    app = held_app(tmp_path / "app", FED, "fedit.federation.app.client_app")
    nodes = [f"partition-id={i} num-partitions=2" for i in range(2)]
    cfg = (f"model='{tmp_path / 'model'}' hparams-file='{tmp_path / 'hp.json'}' corpus='{CORPUS}' "
           f"cache-dir='{tmp_path / 'cache'}' clients=2 slots=1 n-per-client=2 tau=-1.0 threads=1 out='{out}'")
    with deployment(tmp_path, [nodes[0], nodes[1] + f" hold-at='query.reuse/0' hold-file='{held}'"]) as d:
        run = d.start_run(app, cfg + " evaluate=false")  # (one message less: the catch-up evaluates)
        # client-1 has edited and uploaded its slot-0 MKVs; killed while it was to reuse the others'
        wait_for(held.exists, 900, "client-1 to be sent its hits")
        d.kill_node(1)
        log, _ = run.communicate(timeout=1200)
        assert run.returncode == 0, log
        assert not (out / "federation.error.json").exists(), (out / "federation.error.json").read_text()
        fed = json.loads((out / "federation.json").read_text())
        [gone] = fed["missing"]
        assert (gone["client"], gone["slot"], gone["step"]) == ("client-1", 0, "reuse")
        assert "Node Unavailable" in gone["why"]
        slot = fed["slots"][0]
        assert slot["uploaded"] == {"client-0": 2, "client-1": 2} and slot["missing"] == ["client-1"]
        assert {c: v["applied"] for c, v in slot["reuse"].items()} == {"client-0": 2}  # it had client-1's MKVs
        assert fed["mkvs_stored"] == 4

        # The node comes back (its registered key, so the same node id); the rerun catches it up.
        d.restart_node(1, nodes[1])
        done = d(FED, cfg + " evaluate=true resume=true")
        assert done.returncode == 0, done.stdout + done.stderr
    assert not (out / "federation.error.json").exists(), (out / "federation.error.json").read_text()
    fed = json.loads((out / "federation.json").read_text())
    assert fed["missing"][0]["caught_up"] is True and len(fed["missing"]) == 1
    assert fed["catch_ups"][0]["clients"] == ["client-1"]
    slot = fed["slots"][0]
    assert {c: v["applied"] for c, v in slot["reuse"].items()} == {"client-0": 2, "client-1": 2}
    assert fed["mkvs_stored"] == 4  # its slot-0 MKVs were in the store already: not stored twice
    assert set(fed["fededit"]) == {"client-1"} and "efficacy_success" in fed["fededit"]["client-1"]["post"]


def test_collabedit_client_killed_mid_round_is_missing_and_a_rerun_merges_its_facts(tmp_path, tiny_model_dir):
    from fedit.collab.settings import CollabSettings

    from test_collab_deploy import HP as CHP, SALT, run_config

    (tmp_path / "model").symlink_to(tiny_model_dir)
    (tmp_path / "hp.json").write_text(json.dumps(CHP))
    held = tmp_path / "held"
    app = held_app(tmp_path / "app", SRC / "collab" / "app", "fedit.collab.app.client_app")
    s = CollabSettings(model=str(tmp_path / "model"), hparams_file=str(tmp_path / "hp.json"), corpus=str(CORPUS),
                       cache_dir=str(tmp_path / "cache"), clients=2, per_client=2, secagg=False, threads=1,
                       out=str(tmp_path / "out"))
    nodes = [f"partition-id={i} salt='{SALT}'" for i in range(2)]
    with deployment(tmp_path, [nodes[0], nodes[1] + f" hold-at='query.prepare/0' hold-file='{held}'"]) as d:
        run = d.start_run(app, run_config(s))
        # c1 has sent its digests; killed while editing the facts the server let it keep
        wait_for(held.exists, 900, "c1 to be asked to prepare round 1")
        d.kill_node(1)
        log, _ = run.communicate(timeout=1200)
        assert run.returncode == 0, log
        assert not (tmp_path / "out" / "collab.error.json").exists(), (tmp_path / "out" / "collab.error.json").read_text()
        report = json.loads((tmp_path / "out" / "report.json").read_text())
        [gone] = report["missing"]
        assert (gone["client"], gone["round"], gone["step"]) == ("c1", 1, "prepare")
        assert sorted(report["clients"]) == ["c0", "c1"]
        # the round was redone without c1: c0's facts alone were merged and measured
        rnd = report["runs"]["collabedit"]["rounds"][0]
        assert list(rnd["clients"]) == ["c0"] and rnd["edited"] == 2 and list(rnd["by_client"]) == ["c0"]

        # CollabEdit merges a round in one solve over every client's sums, so c1's facts enter
        # through a rerun of the federation with its node back (same key, same node id).
        d.restart_node(1, nodes[1])
        done = d(SRC / "collab" / "app", run_config(s.replace(out=str(tmp_path / "rerun"))))
        assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "rerun" / "report.json").read_text())
    assert report["missing"] == [] and report["clients"] == ["c0", "c1"]
    assert report["runs"]["collabedit"]["rounds"][0]["edited"] == 4
