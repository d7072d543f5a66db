"""FedEdit in deployment on loopback, as users run it: a SuperLink with TLS and SuperNode
authentication, SuperNodes with registered keys, the run started by `flwr run`; a node whose key
was never registered is refused."""

import json

from helpers import CORPUS
from loopback import REFUSED_EXIT, SRC, deployment

APP = SRC / "federation" / "app"
HP = {"mom2_samples": 40, "mom2_seq_len": 32, "v_num_grad_steps": 10, "context_template_length_params": [[4, 5]],
      "layers": [1, 2], "mom2_update_weight": 10.0, "v_lr": 1.0, "clamp_norm_factor": 8.0}


def test_superlink_and_supernodes_with_tls_and_node_authentication(tmp_path, tiny_model_dir):
    (tmp_path / "model").symlink_to(tiny_model_dir)
    (tmp_path / "hp.json").write_text(json.dumps(HP))
    out = tmp_path / "out"
    with deployment(tmp_path, [f"partition-id={i} num-partitions=2" for i in range(2)]) as run:
        # a third organisation with a key pair the SuperLink was never given
        intruder = run.start_node("intruder", "partition-id=1 num-partitions=2")
        assert intruder.wait(timeout=180) != 0  # it gave up: refused, not retrying
        assert f"Exit Code: {REFUSED_EXIT}" in run.log("intruder.log")
        assert "Failed to activate SuperNode" in run.log("intruder.log")
        assert "No SuperNode found with the given public key" in run.log("superlink.log")
        cfg = (f"model='{tmp_path / 'model'}' hparams-file='{tmp_path / 'hp.json'}' corpus='{CORPUS}' "
               f"cache-dir='{tmp_path / 'cache'}' clients=2 slots=1 n-per-client=2 tau=-1.0 threads=1 out='{out}'")
        done = run(APP, cfg)
        assert done.returncode == 0, done.stdout + done.stderr
    # `flwr run` can exit 0 on a failed run: the outcome is what the ServerApp wrote.
    assert not (out / "federation.error.json").exists(), (out / "federation.error.json").read_text()
    fed = json.loads((out / "federation.json").read_text())
    assert sorted(fed["clients"]) == ["client-0", "client-1"]
    assert fed["mkvs_stored"] == 4
    slot = fed["slots"][0]
    assert slot["uploaded"] == {"client-0": 2, "client-1": 2}
    assert {c: v["applied"] for c, v in slot["reuse"].items()} == {"client-0": 2, "client-1": 2}
    assert set(fed["fededit"]) == {"client-0", "client-1"}
    assert all("efficacy_success" in v["post"] for v in fed["fededit"].values())
