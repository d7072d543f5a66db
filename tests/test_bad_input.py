"""A catalogue of bad input through the CLI on a tiny model: each case exits 2 before any work,
with a message naming the problem, one JSON error object under --json, and every file that was
already on disk unchanged (hashed before and after)."""

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from fedit.cli.main import main

from helpers import CORPUS, FAST, run_json


def _hashes(root):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def saved_edit(tiny_model_dir, tmp_path_factory):
    """A real delta file (ROME on the tiny model), for the cases over apply/revert."""
    d = tmp_path_factory.mktemp("saved")
    (d / "hp.json").write_text(json.dumps(FAST))
    code = main(["edit", "--method", "rome", "--prompt", "The {} is located in the city of", "--subject",
                 "Eiffel Tower", "--target", "Rome", "--layers", "1", "--hparams", str(d / "hp.json"),
                 "--corpus", str(CORPUS), "--model", str(tiny_model_dir), "--cache-dir", str(d / "cache"),
                 "--save", str(d / "e.safetensors"), "--threads", "1"])
    assert code == 0
    return d / "e.safetensors"


EDIT = ["edit", "--method", "rome", "--layers", "1", "--corpus", str(CORPUS), "--threads", "1"]
ONE = ["--prompt", "The {} is located in the city of", "--subject", "Eiffel Tower", "--target", "Rome"]


def _write(d, name, data):
    p = d / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(p)


# Each case: (id, argv builder (d, model, delta) -> argv, words the message must hold).
CASES = [
    ("requests-not-utf8", lambda d, m, e: [*EDIT, "--requests", _write(d, "r.json", b'[{"prompt": "\xff\xfe {}"}]')],
     ["not UTF-8"]),
    ("requests-folder", lambda d, m, e: [*EDIT, "--requests", str(d / "folder")], ["is a folder"]),
    ("requests-empty-list", lambda d, m, e: [*EDIT, "--requests", _write(d, "r.json", "[]")], ["no requests"]),
    ("prompt-longer-than-context", lambda d, m, e: [*EDIT, "--prompt", "{} is" + " very" * 300 + " near",
                                                    "--subject", "Paris", "--target", "Rome"], ["tokens", "at most"]),
    ("conflicting-targets", lambda d, m, e: [*EDIT, "--requests", _write(d, "r.jsonl", "\n".join(
        json.dumps({"prompt": "{} is in", "subject": "Paris", "target_new": t}) for t in ("Rome", "Oslo")))],
     ["two targets", "Rome", "Oslo"]),
    ("target-equals-target-true", lambda d, m, e: [*EDIT, *ONE, "--target-true", "Rome"], ["equals target_true"]),
    ("hparams-json-list", lambda d, m, e: [*EDIT, *ONE, "--hparams", _write(d, "hp.json", "[1, 2]")],
     ["not an object"]),
    ("hparams-not-utf8", lambda d, m, e: [*EDIT, *ONE, "--hparams", _write(d, "hp.json", b"\xff{}")], ["hyperparameters"]),
    ("hparams-misspelt-key", lambda d, m, e: [*EDIT, *ONE, "--hparams", _write(d, "hp.json", '{"layerz": [1]}')],
     ["layerz"]),
    ("cache-dir-is-a-file", lambda d, m, e: [*EDIT, *ONE, "--cache-dir", _write(d, "cachefile", "x")],
     ["cache folder"]),
    ("save-into-a-folder", lambda d, m, e: [*EDIT, *ONE, "--save", str(d / "folder")], ["is a folder"]),
    ("out-is-a-file", lambda d, m, e: [*EDIT, *ONE, "--out", str(d / "folder" / "keep.txt")], ["is a file"]),
    ("out-holds-foreign-files", lambda d, m, e: [*EDIT, *ONE, "--out", str(d / "folder")], ["did not write"]),
    ("apply-out-holds-foreign-files", lambda d, m, e: ["apply", str(e), "--out", str(d / "folder")], ["did not write"]),
    ("revert-out-is-a-file", lambda d, m, e: ["revert", str(e), "--out", str(d / "folder" / "keep.txt")],
     ["is a file"]),
    ("fed-unknown-method", lambda d, m, e: ["fed", "run", "--method", "bogus", "--out", str(d / "fo")], ["bogus"]),
    ("collab-one-client-with-secagg", lambda d, m, e: ["collab", "run", "--clients", "1", "--out", str(d / "co")],
     ["SecAgg+ needs 2", "--no-secagg"]),
    ("collab-dp-negative-noise", lambda d, m, e: ["collab", "run", "--engine", "local", "--dp-noise", "-1", "--out",
                                                  str(d / "co")], ["DP noise", "positive"]),
    ("collab-dp-with-baselines", lambda d, m, e: ["collab", "run", "--engine", "local", "--merge", "all", "--dp-noise",
                                                  "1", "--out", str(d / "co")], ["CollabEdit's sums"]),
    ("fed-norm-factor-0", lambda d, m, e: ["fed", "run", "--norm-factor", "0", "--out", str(d / "fo")],
     ["norm-factor", "> 0"]),
    ("fed-paper-mode-without-share-requests", lambda d, m, e: ["fed", "run", "--mode", "paper", "--out", str(d / "fo")],
     ["plaintext requests", "share-requests"]),
    ("fed-method-cannot-federate", lambda d, m, e: ["fed", "run", "--method", "wise", "--out", str(d / "fo")],
     ["cannot take part in FedEdit", "grace", "memit"]),
    ("fed-grace-paper-mode", lambda d, m, e: ["fed", "run", "--method", "grace", "--mode", "paper", "--share-requests",
                                              "--out", str(d / "fo")], ["private mode only"]),
    ("fed-overlap-too-large", lambda d, m, e: ["fed", "run", "--n-per-client", "4", "--overlap", "4", "--out",
                                               str(d / "fo")], ["overlap"]),
    ("eval-batch-size-0", lambda d, m, e: ["eval", "--method", "rome", "--dataset", "counterfact", "--out", str(d / "ev"), "--batch-size", "0"], ["--batch-size 0"]),
    ("eval-out-is-a-file", lambda d, m, e: ["eval", "--method", "rome", "--dataset", "counterfact", "--out",
                                            str(d / "folder" / "keep.txt")], ["is a file"]),
    ("eval-negative-n", lambda d, m, e: ["eval", "--method", "rome", "--dataset", "counterfact", "--out", str(d / "ev"), "--n", "-3"], ["--n -3"]),
]


@pytest.mark.parametrize("build,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_nothing_on_disk_changes(build, words, tiny_model_dir, saved_edit, tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "keep.txt").write_text("a user's file")
    argv = build(tmp_path, tiny_model_dir, saved_edit)
    if "--model" not in argv:
        argv += ["--model", str(tiny_model_dir)]
    if "--cache-dir" not in argv:
        argv += ["--cache-dir", str(tmp_path / "cache")]
    before = _hashes(tmp_path) | _hashes(saved_edit.parent)
    code, err = run_json(capsys, main, argv + ["--json"])
    assert code == 2 and err["exit_code"] == 2, err
    message = json.dumps(err)
    assert all(w in message for w in words), message
    assert "Traceback" not in capsys.readouterr().err
    after = _hashes(tmp_path) | _hashes(saved_edit.parent)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing already there changed
    assert not [k for k in after if k not in before and "/cache/" not in k]  # and no output was left behind


def test_refused_fed_run_keeps_the_previous_runs_results(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("flwr")
    out = tmp_path / "run"
    out.mkdir()
    (out / "federation.json").write_text('{"earlier": "result"}')
    (out / "mkv.sqlite").write_bytes(b"")  # the store an earlier run left
    before = _hashes(tmp_path)
    code, err = run_json(capsys, main, ["fed", "run", "--model", str(tiny_model_dir), "--corpus", str(CORPUS),
                                        "--clients", "2", "--n-per-client", "2", "--slots", "1", "--out", str(out),
                                        "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--json"])
    assert code == 2 and "already exists" in err["error"]
    assert _hashes(tmp_path) == before


def test_unwritable_cache_dir_is_refused_before_loading(tiny_model_dir, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    real = os.access
    if os.geteuid() == 0:  # root writes to any folder: let the access check see what a user would
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if str(p).startswith(str(ro))
                            else real(p, mode, *a, **k))
    try:
        code, err = run_json(capsys, main, [*EDIT, *ONE, "--model", str(tiny_model_dir), "--cache-dir", str(ro / "c"),
                                            "--json"])
    finally:
        ro.chmod(stat.S_IRWXU)
    assert code == 2 and "cache folder" in err["error"]


def _scaled_copy(src, dst, scale=None, nan_originals=False):
    from fedit.deltas import WeightDeltas

    wd = WeightDeltas.load(src)
    if scale is not None:
        wd.deltas = {n: d * scale for n, d in wd.deltas.items()}
        wd.originals = None  # as a tampered file would: the norm bound must hold on its own
    if nan_originals:
        wd.originals = {n: torch.full_like(o, float("nan")) for n, o in wd.originals.items()}
    wd.save(dst)
    return dst


def test_absurd_delta_refused_unless_forced_and_nan_originals_refused_even_forced(tiny_model_dir, saved_edit,
                                                                                   tmp_path, capsys):
    big = _scaled_copy(saved_edit, tmp_path / "big.safetensors", scale=1e30)
    common = ["--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "c"), "--json"]
    code, err = run_json(capsys, main, ["apply", str(big), "--out", str(tmp_path / "m"), *common])
    assert code == 2 and "times the weight's" in err["error"] and not (tmp_path / "m").exists()
    bad = _scaled_copy(saved_edit, tmp_path / "nan.safetensors", nan_originals=True)
    before = _hashes(tmp_path)
    code, err = run_json(capsys, main, ["revert", str(bad), "--force", "--out", str(tmp_path / "m"), *common])
    assert code == 2 and "NaN" in err["error"] and not (tmp_path / "m").exists()
    assert {k: v for k, v in _hashes(tmp_path).items() if "/c/" not in k} == before


def test_misspelt_run_config_key_is_warned_about_and_other_apps_keys_are_not(caplog):
    from fedit.federation.settings import FedSettings

    with caplog.at_level("WARNING", logger="fedit.federation.settings"):
        s = FedSettings.from_user_config({"clinets": 7, "num-server-rounds": 2})
    assert "'clinets'" in caplog.text and "'clients'" in caplog.text
    assert "num-server-rounds" not in caplog.text and s.clients != 7, caplog.text


def test_full_disk_while_writing_out_keeps_the_previous_model_folder(tiny_model_dir, saved_edit, tmp_path, capsys,
                                                                      monkeypatch):
    import errno

    import transformers

    from fedit.models.loading import BASE_FILE

    out = tmp_path / "edited"
    out.mkdir()
    (out / BASE_FILE).write_text("{}")  # an earlier fedit --out
    (out / "model.safetensors").write_bytes(b"earlier weights")
    before = _hashes(tmp_path)

    def full_disk(self, path, *a, **k):
        (Path(path) / "model.safetensors").write_bytes(b"half")  # a partial file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full_disk)
    code, err = run_json(capsys, main, ["apply", str(saved_edit), "--out", str(out), "--model", str(tiny_model_dir),
                                        "--cache-dir", str(tmp_path / "c"), "--json"])
    assert code == 2 and "No space left" in err["error"] and "unchanged" in err["error"]
    assert {k: v for k, v in _hashes(tmp_path).items() if "/c/" not in k} == before  # no half folder, old one intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "edited"]


def test_forced_absurd_delta_still_prints_valid_json(tiny_model_dir, saved_edit, tmp_path, capsys):
    big = _scaled_copy(saved_edit, tmp_path / "big.safetensors", scale=1e30)
    code = main(["apply", str(big), "--force", "--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "c"),
                 "--json"])
    (line,) = capsys.readouterr().out.strip().splitlines()

    def refuse(name):
        raise AssertionError(f"bare {name} in --json output")

    out = json.loads(line, parse_constant=refuse)  # NaN/Infinity are not JSON
    assert code == 0 and out["requests"][0]["after"]["target_prob"] is None  # the broken model's NaN, as null


def test_save_folder_unwritable_after_the_check_keeps_the_computed_edit(tiny_model_dir, tmp_path, capsys,
                                                                         monkeypatch):
    """``--save`` passes the check before the edit, then its folder goes away (replaced by a file)
    while the edit is computed: exit 2 naming the path, and the computed edit is kept in the
    cache folder, where the message says, loadable as it is."""
    import fedit.api

    from fedit.deltas import WeightDeltas

    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "hp.json").write_text(json.dumps(FAST))
    real = fedit.api.sequential_edit

    def edit_then_lose_the_folder(*a, **k):
        results = real(*a, **k)
        out.rename(tmp_path / "moved")
        out.write_text("now a file")  # writing out/e.safetensors fails: Not a directory
        return results

    monkeypatch.setattr(fedit.api, "sequential_edit", edit_then_lose_the_folder)
    code, err = run_json(capsys, main, [*EDIT, *ONE, "--hparams", str(tmp_path / "hp.json"), "--model",
                                        str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache"),
                                        "--save", str(out / "e.safetensors"), "--json"])
    assert code == 2 and f"cannot write {out / 'e.safetensors'}" in err["error"], err
    (kept,) = (tmp_path / "cache" / "unsaved").glob("*.safetensors")
    assert f"kept in {kept}" in err["error"] and f"mv {kept} {out / 'e.safetensors'}" in err["fix"]
    wd = WeightDeltas.load(kept)
    assert wd.method == "rome" and wd.originals is not None and len(wd.deltas) == 1
    assert out.read_text() == "now a file" and not list((tmp_path / "moved").iterdir())


def test_forged_target_cache_entry_of_the_wrong_shape_is_recomputed_not_used(tiny_model_dir, tmp_path, capsys,
                                                                             caplog):
    """A target-cache entry whose key and checksum were forged to match but whose vectors have
    another size than the model's is refused by the shape check at load time: the run warns,
    recomputes the target and gives the same edit as with a clean cache."""
    from fedit.target_cache import _checksum

    (tmp_path / "hp.json").write_text(json.dumps(FAST))
    argv = [*EDIT, *ONE, "--hparams", str(tmp_path / "hp.json"), "--model", str(tiny_model_dir), "--cache-dir",
            str(tmp_path / "cache"), "--target-cache", str(tmp_path / "targets"), "--json"]
    code, first = run_json(capsys, main, argv)
    (entry,) = (tmp_path / "targets").rglob("*.pt")
    data = torch.load(entry, weights_only=True)
    key = data.pop("key")
    data.pop("checksum")
    data["z"], data["h"] = torch.ones(8), torch.zeros(8)  # another model's size; checksum and key recomputed
    data.update(checksum=_checksum(data), key=key)
    torch.save(data, entry)
    with caplog.at_level("WARNING", logger="fedit.target_cache"):
        code2, second = run_json(capsys, main, argv)
    assert code == code2 == 0
    assert "z has shape (8,)" in caplog.text and "recomputed" in caplog.text
    assert second["requests"][0]["after"] == first["requests"][0]["after"]
    assert torch.load(entry, weights_only=True)["z"].shape != (8,)  # the entry was rewritten
