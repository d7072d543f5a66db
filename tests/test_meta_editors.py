"""fedit train + MEND and KE on tiny random models: training, checkpoints, resume, editing."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fedit.cli.main import main
from fedit.core.probe import continuation_logprob
from fedit.data.loaders import load_records, sample_path
from fedit.errors import FeditError
from fedit.methods import get_method, hparams_for
from tests.helpers import run_json

ZSRE = str(sample_path("zsre"))
TINY = {"rank": 16, "checkpoint_every": 3, "val_n": 4}


def _hp_file(tmp_path, method, extra=None):
    p = tmp_path / f"{method}-hp.json"
    p.write_text(json.dumps({**(TINY if method == "mend" else {"checkpoint_every": 3, "val_n": 4,
                                                                "lstm_hidden": 16, "cond_dim": 32,
                                                                "head_hidden": 16}), **(extra or {})}))
    return str(p)


def _train(capsys, model_dir, out, hp, steps, resume=False, method="mend"):
    argv = ["train", "--method", method, "--dataset", "zsre", "--data", ZSRE, "--n", "40", "--model", str(model_dir),
            "--out", str(out), "--steps", str(steps), "--seed", "3", "--hparams", hp, "--json", "--threads", "1"]
    return run_json(capsys, main, argv + (["--resume"] if resume else []))


def test_train_checkpoints_and_resume_gives_the_uninterrupted_result(tmp_path, tiny_model_dir, capsys):
    hp = _hp_file(tmp_path, "mend")
    code, full = _train(capsys, tiny_model_dir, tmp_path / "full", hp, 6)
    assert code == 0 and full["steps"] == 6 and full["complete"]
    assert [h["step"] for h in full["history"]] == [3, 6]
    for key in ("efficacy_acc", "locality", "nll_pre", "nll_post"):
        assert key in full["validation"]
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == ["step-000003.pt", "step-000006.pt"]
    info = json.loads((tmp_path / "full" / "editor.json").read_text())
    assert info["method"] == "mend" and info["training"]["file"] == "zsre_sample.json"
    assert info["training"]["n_train"] == full["n_train"] and full["n_val"] == 4

    code, part = _train(capsys, tiny_model_dir, tmp_path / "part", hp, 3)
    assert code == 0 and part["steps"] == 3
    # an existing run is not overwritten without --resume
    code, err = _train(capsys, tiny_model_dir, tmp_path / "part", hp, 6)
    assert code == 2 and "--resume" in err["error"]
    code, resumed = _train(capsys, tiny_model_dir, tmp_path / "part", hp, 6, resume=True)
    assert code == 0 and resumed["steps"] == 6
    a = load_file(str(tmp_path / "full" / "editor.safetensors"))
    b = load_file(str(tmp_path / "part" / "editor.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["validation"] for h in resumed["history"]] == [h["validation"] for h in full["history"]]


def test_resume_without_a_checkpoint_is_refused_before_loading_anything(tmp_path, capsys, monkeypatch):
    """--resume on a folder with no run: named at once, before the data or the model are read
    (a SERAC run used to build its whole training set first)."""
    import fedit.data.loaders as loaders

    def boom(*a, **k):
        raise AssertionError("loaded the data before checking --resume")

    monkeypatch.setattr(loaders, "load_records", boom)
    code, err = _train(capsys, tmp_path / "no-model", tmp_path / "empty", _hp_file(tmp_path, "mend"), 3, resume=True)
    assert code == 2 and "no checkpoint" in err["error"] and "without --resume" in err["fix"]


def test_resume_refuses_other_settings(tmp_path, tiny_model_dir, capsys):
    _train(capsys, tiny_model_dir, tmp_path / "run", _hp_file(tmp_path, "mend"), 3)
    code, err = _train(capsys, tiny_model_dir, tmp_path / "run", _hp_file(tmp_path, "mend", {"cedit": 0.5}), 6,
                       resume=True)
    assert code == 2 and "hparams" in err["error"]


@pytest.mark.parametrize("method", ["mend", "ke"])
def test_trained_editor_lowers_the_target_nll_and_reverts_exactly(tmp_path, tiny_model_dir, capsys, method):
    from fedit.api import edit
    from fedit.models.loading import load_model

    code, res = _train(capsys, tiny_model_dir, tmp_path / method, _hp_file(tmp_path, method, {"checkpoint_every": 30}),
                       30, method=method)
    assert code == 0
    lm = load_model(str(tiny_model_dir), device="cpu")
    reqs = [r.request for r in load_records("zsre", ZSRE, 40)[:8]]  # records like those trained on
    before = [lp for lp, _ in continuation_logprob(lm, [r.filled_prompt for r in reqs], [r.target_new for r in reqs])]
    weights = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    fell = 0
    for r, b in zip(reqs, before):
        out = edit(lm, [r], method=method, overrides={"archive": str(tmp_path / method)})
        names = set(out.deltas.deltas)
        assert names == {lm.adapter.w_out_param_name(l) for l in (1, 2, 3)}  # the last three of four layers
        (after, _), = continuation_logprob(lm, [r.filled_prompt], [r.target_new])
        fell += after > b
        out.applied.revert()
    assert fell >= 6, f"the target's log-probability rose for only {fell} of 8 edits"
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, weights[n]), n


def test_meta_methods_need_a_trained_editor_of_their_own_kind(tmp_path, tiny_model_dir, capsys):
    from fedit.models.loading import load_model

    lm = load_model(str(tiny_model_dir), device="cpu")
    req = load_records("zsre", ZSRE, 1)[0].request
    with pytest.raises(FeditError, match="needs a trained editor"):
        get_method("mend").run(lm, [req], hparams_for("mend", lm), None)
    _train(capsys, tiny_model_dir, tmp_path / "k", _hp_file(tmp_path, "ke"), 3, method="ke")
    with pytest.raises(FeditError, match="'ke' editor"):
        get_method("mend").run(lm, [req], hparams_for("mend", lm, {"archive": str(tmp_path / "k")}), None)


def test_eval_with_a_trained_editor(tmp_path, tiny_model_dir, capsys):
    _train(capsys, tiny_model_dir, tmp_path / "m", _hp_file(tmp_path, "mend"), 3)
    code, rep = run_json(capsys, main, ["eval", "--method", "mend", "--editor", str(tmp_path / "m"), "--dataset", "zsre",
                                        "--n", "3", "--batch-size", "1", "--fluency-n", "0", "--model",
                                        str(tiny_model_dir), "--out", str(tmp_path / "ev"), "--json", "--threads", "1"])
    assert code == 0 and rep["n"] == 3 and "efficacy_acc" in rep["metrics"] and "locality" in rep["metrics"]
