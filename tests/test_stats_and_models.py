
import pytest
import torch

from fedit.core.solve import rmsnorm_preimage
from fedit.errors import ModelError, StatsError
from fedit.models.adapters import ModelAdapter
from fedit.models.loading import load_model, resolve_model_path
from fedit.stats_cache import second_moments, stats_dir
from fedit.testing import ARCHS, tiny_model

from helpers import CORPUS


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_names_every_part(arch):
    lm = tiny_model(arch)
    ad = lm.adapter
    assert ad.n_layers == 4
    d_out, d_in = ad.w_out_dims(1)
    assert d_out == ad.d_model == 64 and d_in == 128
    assert ad.w_out_param_name(1) in dict(lm.model.named_parameters())
    assert ad.final_norm() is not None and ad.unembed() is not None and ad.embed() is not None
    delta = torch.randn(d_out, d_in)
    assert ad.to_param_layout(delta).shape == ad.w_out(1).weight.shape
    with pytest.raises(ModelError, match="layer 9 does not exist"):
        ad.block_name(9)


def test_unsupported_architecture_is_named():
    class Fake(torch.nn.Module):
        class config:
            model_type = "bert"
    with pytest.raises(ModelError, match="'bert' is not supported"):
        ModelAdapter(Fake())


def test_rmsnorm_preimage_hits_reachable_targets():
    g = torch.rand(64) * 3
    g[:5] = 0.0  # coordinates the norm ignores
    x = torch.randn(3, 64)
    norm = lambda v: g * v / v.pow(2).mean(-1, keepdim=True).sqrt()  # noqa: E731
    want = norm(torch.randn(3, 64) * 7)  # reachable: an output of the norm
    got = rmsnorm_preimage(want, g, x, ridge=1e-8)
    assert torch.allclose(norm(got), want, atol=1e-3)
    assert torch.allclose(got.pow(2).mean(-1), x.pow(2).mean(-1), rtol=1e-4)  # scale kept


def test_stats_single_pass_cache_and_resume(tmp_path, monkeypatch):
    lm = tiny_model("gpt2")
    a = second_moments(lm, [1, 2], corpus=CORPUS, samples=12, seq_len=16, batch_size=4, cache_dir=tmp_path / "a")
    # Per-layer runs give the same matrices as the one pass over both layers.
    b1 = second_moments(lm, [1], corpus=CORPUS, samples=12, seq_len=16, cache_dir=tmp_path / "b")
    assert torch.allclose(a[1], b1[1], rtol=1e-5, atol=1e-7)
    assert a[1].shape == (128, 128) and torch.allclose(a[1], a[1].T)
    # Cached: a second call reads the files (no forward pass).
    import fedit.stats_cache as sc

    def boom(*args, **kwargs):
        raise AssertionError("recomputed although cached")
    monkeypatch.setattr(sc, "accumulate", boom)
    again = second_moments(lm, [1, 2], corpus=CORPUS, samples=12, seq_len=16, cache_dir=tmp_path / "a")
    assert torch.equal(again[2], a[2])
    monkeypatch.undo()

    # Interrupt after two batches, then resume: same result as the uninterrupted run.
    real = sc.accumulate

    def interrupted(lm_, layers, chunks, state=None, on_batch=None, **kw):
        calls = [0]

        def cb(st, n):
            on_batch(st, n)
            calls[0] += 1
            if calls[0] == 2:
                raise KeyboardInterrupt
        return real(lm_, layers, chunks, state, on_batch=cb, **kw)
    monkeypatch.setattr(sc, "accumulate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        second_moments(lm, [1, 2], corpus=CORPUS, samples=12, seq_len=16, batch_size=4, cache_dir=tmp_path / "c",
                       checkpoint_seconds=0)
    monkeypatch.undo()
    partials = list(stats_dir(lm, sc.open_corpus(CORPUS), tmp_path / "c").glob("partial-*"))
    assert len(partials) == 1
    seen = []
    orig = sc.accumulate

    def spy(lm_, layers, chunks, state=None, **kw):
        seen.append(state.chunks if state else 0)
        return orig(lm_, layers, chunks, state, **kw)
    monkeypatch.setattr(sc, "accumulate", spy)
    resumed = second_moments(lm, [1, 2], corpus=CORPUS, samples=12, seq_len=16, batch_size=4,
                             cache_dir=tmp_path / "c")
    assert seen == [8]  # picked up after the two saved batches of 4 chunks
    assert torch.allclose(resumed[2], a[2], rtol=1e-5, atol=1e-7)
    assert not list(stats_dir(lm, sc.open_corpus(CORPUS), tmp_path / "c").glob("partial-*"))


def test_corrupt_stats_file_is_named(tmp_path):
    lm = tiny_model("gpt2")
    second_moments(lm, [1], corpus=CORPUS, samples=4, seq_len=16, cache_dir=tmp_path)
    (f,) = stats_dir(lm, __import__("fedit.corpus").corpus.open_corpus(CORPUS), tmp_path).glob("layer1-*")
    f.write_bytes(b"broken")
    with pytest.raises(StatsError, match="corrupt.*delete it"):
        second_moments(lm, [1], corpus=CORPUS, samples=4, seq_len=16, cache_dir=tmp_path)
    with pytest.raises(StatsError, match="does not exist"):
        second_moments(lm, [1], corpus=tmp_path / "missing.txt", samples=4, seq_len=16, cache_dir=tmp_path)


def test_load_model_from_local_folder(tmp_path):
    lm = tiny_model("llama")
    lm.model.save_pretrained(tmp_path / "m")
    lm.tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"), device="cpu")
    assert loaded.model_type == "llama"
    for (n, p), (_, q) in zip(lm.model.named_parameters(), loaded.model.named_parameters()):
        assert torch.equal(p, q), n
    # A hub name is passed through (loaded only where a network exists); a folder without config is refused.
    assert resolve_model_path("EleutherAI/gpt-j-6b") == ("EleutherAI/gpt-j-6b", False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


@pytest.mark.parametrize("damage,match", [(lambda C: C[:-1], "has shape"), (lambda C: C * 0, "not a second moment"),
                                          (lambda C: -C, "not a second moment"),
                                          (lambda C: C.fill_diagonal_(float("nan")), "NaN")])
def test_stats_file_that_cannot_be_a_second_moment_is_refused(tmp_path, damage, match):
    from safetensors.torch import load_file, save_file

    lm = tiny_model("gpt2")
    second_moments(lm, [1], corpus=CORPUS, samples=4, seq_len=16, cache_dir=tmp_path)
    (f,) = stats_dir(lm, __import__("fedit.corpus").corpus.open_corpus(CORPUS), tmp_path).glob("layer1-*")
    save_file({"mom2": damage(load_file(str(f))["mom2"]).contiguous()}, str(f))
    with pytest.raises(StatsError, match=f"{match}.*delete it"):
        second_moments(lm, [1], corpus=CORPUS, samples=4, seq_len=16, cache_dir=tmp_path)
