"""The disk cache of optimised targets, and target optimisation under autocast."""

import dataclasses

import pytest
import torch

from fedit import edit, hparams_for
from fedit.core.targets import compute_targets
from fedit.core.templates import flat
from fedit.methods import Resources
from fedit.target_cache import TargetCache, weights_digest
from fedit.testing import tiny_model

from helpers import CORPUS, DARRIEUX, EIFFEL, FAST, JORDAN


def _setup(tiny_cache, tmp_path, method="memit"):
    lm = tiny_model("gpt2")
    res = Resources(cache_dir=tiny_cache, corpus=str(CORPUS), target_cache=tmp_path / "targets")
    hp = hparams_for(method, lm, {**FAST, "layers": [1, 2] if method == "memit" else [1]})
    return lm, res, hp


def test_second_run_takes_every_target_from_the_cache_and_gives_the_same_edit(tiny_cache, tmp_path):
    lm, res, hp = _setup(tiny_cache, tmp_path)
    first = edit(lm, [EIFFEL, JORDAN], hparams=hp, resources=res, apply=False).outcome
    assert [t["cached"] for t in first.targets] == [False, False]
    again = edit(lm, [EIFFEL, JORDAN, DARRIEUX], hparams=hp, resources=res, apply=False).outcome
    assert [t["cached"] for t in again.targets] == [True, True, False]
    # the cached z are the ones optimised the first time
    no_cache = dataclasses.replace(res, target_cache=None, _targets=None)
    fresh = edit(lm, [EIFFEL, JORDAN], hparams=hp, resources=no_cache, apply=False).outcome
    for name in first.deltas.deltas:
        assert torch.allclose(first.deltas.deltas[name], fresh.deltas.deltas[name], atol=1e-5)
    cached = edit(lm, [EIFFEL, JORDAN], hparams=hp, resources=res, apply=False).outcome
    for name in first.deltas.deltas:
        assert torch.equal(first.deltas.deltas[name], cached.deltas.deltas[name])
    assert all(t["cached"] for t in cached.targets)


def test_key_changes_with_weights_config_and_request(tiny_cache, tmp_path):
    lm, res, hp = _setup(tiny_cache, tmp_path)
    cache = res.target_store()
    templates = flat(res.templates(lm, hp.context_template_length_params))
    cfg = hp.target_config()
    k = cache.keys(lm, [EIFFEL, JORDAN], templates, cfg)
    assert len(set(k)) == 2
    assert cache.keys(lm, [EIFFEL], templates, cfg)[0] == k[0]
    assert cache.keys(lm, [EIFFEL], templates, dataclasses.replace(cfg, steps=cfg.steps + 1))[0] != k[0]
    assert cache.keys(lm, [EIFFEL], templates[:1], cfg)[0] != k[0]
    # an edit applied to the model changes the key: targets of an edited model are never reused
    before = weights_digest(lm.model)
    applied = edit(lm, [DARRIEUX], hparams=hp, resources=res).applied
    assert weights_digest(lm.model) != before
    assert cache.keys(lm, [EIFFEL], templates, cfg)[0] != k[0]
    applied.revert()
    assert weights_digest(lm.model) == before
    assert cache.keys(lm, [EIFFEL], templates, cfg)[0] == k[0]


def test_rome_uses_the_cache_per_request(tiny_cache, tmp_path):
    lm, res, hp = _setup(tiny_cache, tmp_path, method="rome")
    edit(lm, [EIFFEL], method="rome", hparams=hp, resources=res, apply=False)
    out = edit(lm, [EIFFEL, JORDAN], method="rome", hparams=hp, resources=res, apply=False).outcome
    # the first request sees the unedited model (cached); the second sees the model with the first edit
    assert [t["cached"] for t in out.targets] == [True, False]


def test_damaged_cache_file_is_recomputed_and_replaced(tiny_cache, tmp_path, caplog):
    lm, res, hp = _setup(tiny_cache, tmp_path)
    edit(lm, [EIFFEL], hparams=hp, resources=res, apply=False)
    files = list((tmp_path / "targets").rglob("*.pt"))
    assert len(files) == 1
    files[0].write_bytes(b"not a torch file")
    fresh = TargetCache(tmp_path / "targets")
    res2 = dataclasses.replace(res, _targets=fresh)
    out = edit(lm, [EIFFEL], hparams=hp, resources=res2, apply=False).outcome
    assert out.targets[0]["cached"] is False
    assert "damaged" in caplog.text
    assert fresh.get(fresh.keys(lm, [EIFFEL], flat(res.templates(lm, hp.context_template_length_params)),
                                hp.target_config())[0]) is not None


def test_unwritable_cache_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(Exception, match="--target-cache"):
        TargetCache(blocker / "sub")


def test_bfloat16_autocast_targets_are_close_to_float32(tiny_cache, tmp_path):
    lm, res, hp = _setup(tiny_cache, tmp_path)
    templates = flat(res.templates(lm, hp.context_template_length_params))
    cfg = hp.target_config()
    full = compute_targets(lm, [EIFFEL, JORDAN], templates, cfg)
    half = compute_targets(lm, [EIFFEL, JORDAN], templates, dataclasses.replace(cfg, autocast="bfloat16"))
    for a, b in zip(full, half):
        assert b.z.dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(a.delta, b.delta, dim=0)
        assert cos > 0.95, cos
        assert b.nll_end < b.nll_start


def test_target_precision_is_validated_and_reaches_the_config(tiny_cache, tmp_path):
    lm, _, _ = _setup(tiny_cache, tmp_path)
    assert hparams_for("memit", lm, {"target_precision": "bfloat16"}).target_config().autocast == "bfloat16"
    assert hparams_for("pmet", lm, {"target_precision": "bfloat16"}).target_config().autocast == "bfloat16"
    assert hparams_for("rome", lm, {"target_precision": "float32"}).target_config().autocast is None
    with pytest.raises(Exception, match="target_precision"):
        hparams_for("memit", lm, {"target_precision": "int8"})


def test_swapped_or_altered_entries_are_detected_and_recomputed(tiny_cache, tmp_path, caplog):
    lm, res, hp = _setup(tiny_cache, tmp_path)
    edit(lm, [EIFFEL, JORDAN], hparams=hp, resources=res, apply=False)
    a, b = sorted((tmp_path / "targets").rglob("*.pt"))
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)  # swapped: each file holds the other request's target
    b.write_bytes(da)
    fresh = TargetCache(tmp_path / "targets")
    out = edit(lm, [EIFFEL, JORDAN], hparams=hp, resources=dataclasses.replace(res, _targets=fresh),
               apply=False).outcome
    assert [t["cached"] for t in out.targets] == [False, False] and "another key" in caplog.text
    data = torch.load(a, weights_only=True)  # rewritten correctly; now alter its z in place
    data["z"] = data["z"] + 1.0
    torch.save(data, a)
    key = a.stem
    assert TargetCache(tmp_path / "targets").get(key) is None and "checksum mismatch" in caplog.text
