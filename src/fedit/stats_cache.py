"""Second-moment statistics on disk: keyed by (model, layer, corpus, sample count, chunk length).

Computing is resumable: a partial file with the running sums is written every
``checkpoint_seconds`` and picked up by the next call with the same key.
"""

from __future__ import annotations

import logging
import os
import re
import time
from itertools import islice
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fedit.atomic import replace_with

from fedit import progress as fedit_progress
from fedit.core.moments import MomentSums, accumulate
from fedit.corpus import Corpus, open_corpus
from fedit.errors import StatsError
from fedit.paths import cache_root

log = logging.getLogger(__name__)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[-60:]


def stats_dir(lm, corpus: Corpus, cache_dir: str | os.PathLike | None = None) -> Path:
    ident = lm.identity()
    return cache_root(cache_dir) / "stats" / f"{_safe(ident['name'])}-{ident['fingerprint']}" / corpus.id


def _atomic_save(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> None:
    replace_with(path, lambda tmp: save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                                             metadata=meta))


def check_second_moment(C: torch.Tensor, d_in: int, path: Path) -> None:
    """Refuse a loaded E[k kᵀ] that cannot be one: wrong shape [d_in, d_in], NaN/Inf, or a
    diagonal that is negative somewhere or zero everywhere (a second moment is positive
    semi-definite, so its diagonal is ≥ 0; an all-zero one would make every edit a no-op)."""
    bad = None
    if tuple(C.shape) != (d_in, d_in):
        bad = f"has shape {tuple(C.shape)}, the layer needs ({d_in}, {d_in})"
    elif not torch.isfinite(C).all():
        bad = "holds NaN or Inf"
    elif (C.diagonal() < 0).any() or not (C.diagonal() > 0).any():
        bad = "is not a second moment (its diagonal is negative or all zero)"
    if bad:
        raise StatsError(f"the statistics file {path} {bad}.", "delete it; the next run recomputes it.")


def load_second_moment(path: Path, d_in: int) -> torch.Tensor:
    """The cached E[k kᵀ] in ``path`` as float32 [d_in, d_in]; a file that is unreadable, not a
    real float tensor, or not a second moment (:func:`check_second_moment`) is a StatsError."""
    try:
        C = load_file(str(path))["mom2"]
    except (SafetensorError, KeyError, OSError) as e:
        raise StatsError(f"the statistics file {path} is corrupt ({e}).", "delete it; the next run recomputes it.") from e
    if not C.is_floating_point():
        raise StatsError(f"the statistics file {path} holds {C.dtype} values, not real numbers.",
                         "delete it; the next run recomputes it.")
    C = C.float()
    check_second_moment(C, d_in, path)
    return C


def load_partial(path: Path, dims: dict[int, int], device) -> MomentSums | None:
    """The running sums of an interrupted computation (``dims``: layer -> d_in), or None when the
    file is missing or unusable (logged; the computation starts over)."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            sums = {l: f.get_tensor(f"sum{l}") for l in dims}
        tokens, chunks = int(meta["tokens"]), int(meta["chunks"])
        for l, t in sums.items():
            if tuple(t.shape) != (dims[l], dims[l]) or not t.is_floating_point() or not torch.isfinite(t).all():
                raise ValueError(f"sum{l} is {t.dtype} {tuple(t.shape)} or not finite, not ({dims[l]}, {dims[l]})")
        if tokens <= 0 or chunks <= 0:
            raise ValueError(f"it counts {tokens} tokens in {chunks} chunks")
    except (SafetensorError, KeyError, OSError, ValueError) as e:
        log.warning("ignoring unreadable partial statistics %s (%s); starting over", path, e)
        return None
    return MomentSums(sums={l: t.to(device) for l, t in sums.items()}, tokens=tokens, chunks=chunks)


def second_moments(lm, layers: list[int], corpus: str | Path | Corpus | None = None, samples: int = 1000,
                   seq_len: int = 128, batch_size: int = 8, cache_dir: str | os.PathLike | None = None,
                   progress: bool = False, checkpoint_seconds: float = 20.0) -> dict[int, torch.Tensor]:
    """C = E[k kᵀ] for each layer (float32, [d_in, d_in]), from the cache or computed once.

    ``samples`` is the number of corpus chunks of ``seq_len`` tokens; every token of a chunk
    contributes one key. All missing layers are computed in one pass.
    """
    if samples <= 0 or seq_len <= 1:
        raise StatsError(f"samples={samples}, seq_len={seq_len} cannot give statistics.",
                         "use samples ≥ 1 and seq_len ≥ 2.")
    corpus = corpus if isinstance(corpus, Corpus) else open_corpus(corpus)
    folder = stats_dir(lm, corpus, cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tag = f"n{samples}-t{seq_len}"
    final = {l: folder / f"layer{l}-{tag}.safetensors" for l in sorted(set(layers))}
    out: dict[int, torch.Tensor] = {}
    for l, path in final.items():
        if path.exists():
            out[l] = load_second_moment(path, lm.adapter.w_out_dims(l)[1]).to(lm.device)
    missing = [l for l in final if l not in out]
    if not missing:
        return out

    partial = folder / f"partial-{'_'.join(map(str, missing))}-{tag}.safetensors"
    running = load_partial(partial, {l: lm.adapter.w_out_dims(l)[1] for l in missing}, lm.device)
    if running is not None:
        log.info("resuming statistics at chunk %d/%d from %s", running.chunks, samples, partial)

    done = running.chunks if running else 0
    chunks = islice(corpus.chunks(lm.tokenizer, seq_len), done, samples)
    big = max(lm.adapter.w_out_dims(l)[1] for l in missing) > 8192  # float64 would not fit for GPT-J
    last = [time.monotonic()]
    with fedit_progress.task(f"second moments, layers {missing}", total=samples, unit="chunk", initial=done,
                             enabled=progress) as bar:

        def checkpoint(st: MomentSums, n: int) -> None:
            bar.update(n)
            if time.monotonic() - last[0] >= checkpoint_seconds:
                _atomic_save({f"sum{l}": st.sums[l] for l in missing},
                             {"tokens": str(st.tokens), "chunks": str(st.chunks)}, partial)
                last[0] = time.monotonic()

        running = accumulate(lm, missing, chunks, running, batch_size=batch_size,
                             accum_dtype=torch.float32 if big else torch.float64, on_batch=checkpoint)
    if running.tokens == 0:
        raise StatsError(f"corpus {corpus.id} gave no tokens.", "use a corpus with text in it.")
    if running.chunks < samples:
        log.warning("corpus %s has only %d chunks of %d tokens; asked for %d", corpus.id, running.chunks,
                    seq_len, samples)
    for l in missing:
        mom2 = running.second_moment(l).float()
        _atomic_save({"mom2": mom2}, {"layer": str(l), "tokens": str(running.tokens),
                                      "chunks": str(running.chunks), "corpus": corpus.id, "model": lm.name}, final[l])
        out[l] = mom2
    partial.unlink(missing_ok=True)
    return out


def null_space_projectors(lm, layers: list[int], threshold: float, corpus: str | Path | Corpus | None = None,
                          samples: int = 1000, seq_len: int = 128, cache_dir: str | os.PathLike | None = None,
                          progress: bool = False) -> dict[int, torch.Tensor]:
    """AlphaEdit's null-space projector P [d_in, d_in] per layer, from the second moments.

    Cached beside the statistics it comes from (same folder and key, plus the threshold).
    """
    from fedit.core.solve import null_space_projector

    corpus = corpus if isinstance(corpus, Corpus) else open_corpus(corpus)
    folder = stats_dir(lm, corpus, cache_dir)
    tag = f"n{samples}-t{seq_len}-null{threshold:g}"
    out: dict[int, torch.Tensor] = {}
    missing = []
    for l in sorted(set(layers)):
        path = folder / f"projector{l}-{tag}.safetensors"
        if path.exists():
            try:
                out[l] = load_file(str(path))["P"].to(lm.device)
                continue
            except (SafetensorError, KeyError, OSError) as e:
                log.warning("recomputing unreadable projector %s (%s)", path, e)
        missing.append(l)
    if missing:
        C = second_moments(lm, missing, corpus=corpus, samples=samples, seq_len=seq_len, cache_dir=cache_dir,
                           progress=progress)
        for l in missing:
            P, rank = null_space_projector(C[l].cpu(), threshold)
            log.info("layer %d: null space of rank %d of %d (threshold %g)", l, rank, P.shape[0], threshold)
            _atomic_save({"P": P}, {"layer": str(l), "rank": str(rank), "threshold": repr(threshold),
                                    "corpus": corpus.id, "model": lm.name}, folder / f"projector{l}-{tag}.safetensors")
            out[l] = P.to(lm.device)
    return out
