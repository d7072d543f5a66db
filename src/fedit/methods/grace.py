"""GRACE (Hartvigsen et al. 2023): a codebook at one layer with deferral radii; lifelong, no
training of the model.

At layer ``L`` the memory wraps ``W_out`` (the MLP output projection). Each entry has a key (an
input of ``W_out``: the MLP activation at one position), a value (a vector that replaces
``W_out``'s output there), a deferral radius ε and a label (the token that position must
predict). At inference every position whose activation lies within ε of its nearest key gets
that key's value; every other position is computed as before.

Writing an edit: the positions that predict the target's tokens (the prompt's last token, then
each target token but the last, as in teacher forcing and in generation) each give a query.
For each query, with the nearest entry at distance d:

- no entry, or d > ε_init + ε_nearest: a new entry (key = query, ε = ε_init);
- d within reach and the same label: the entry widens to cover the query (ε = max(ε, d));
- d within reach, another label: a new entry, and the two split the distance (both ε = d/2);
- the same input again (d ≈ 0) with another label: the entry takes the new label (and value).

Then the values of the entries the edit uses are optimised with Adam (a few steps, from the
layer's current output: a "warm" start) so that the model produces the target, the rest of the
codebook acting as at inference. Base weights never change: the edit is a
:class:`~fedit.memory.MemoryEdit`, and the codebook carries across sequential batches as the
method's state.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from fedit.core.tokens import encode, target_ids, validate_for_tokenizer
from fedit.errors import FeditError, HparamsError
from fedit.memory import MemoryEdit, linear_dims, memory_tensor, output_hook, register_memory
from fedit.methods import Method, register
from fedit.methods.base import EditOutcome, Resources
from fedit.methods.hparams import check_vocab_subset
from fedit.methods.tail import Tail, target_rows
from fedit.requests import EditRequest

log = logging.getLogger(__name__)


@dataclass
class GraceHparams:
    layers: list[int]  # exactly one: the layer whose W_out the codebook wraps
    eps: float = 1.0  # initial deferral radius, in the units of W_out's input (Euclidean)
    n_iter: int = 100  # maximal Adam steps on an edit's values
    lr: float = 0.3  # Adam step, in units of the RMS of W_out's output at the edit's positions
    nll_stop: float = 0.01  # stop once the edit's mean target NLL is below this
    # Between every vocab_refresh-th step the target NLL reads only a candidate vocabulary of
    # the top vocab_subset tokens per position (methods.tail.Tail); 0: every step exact
    vocab_subset: int = 0
    vocab_refresh: int = 5

    def __post_init__(self):
        if len(self.layers) != 1:
            raise HparamsError(f"GRACE keeps its codebook at one layer, got layers {self.layers}.",
                               "pass one layer, e.g. --layers 12.")
        if self.eps <= 0 or self.n_iter < 0 or self.lr <= 0:
            raise HparamsError("eps and lr must be positive and n_iter at least 0.", "e.g. eps 1.0, n_iter 100, lr 0.3.")
        check_vocab_subset(self.vocab_subset, self.vocab_refresh)


@dataclass
class GraceState:
    """The codebook so far, by layer (one layer in practice): what a sequential batch continues."""

    keys: dict[int, torch.Tensor]  # [n, d_in]
    values: dict[int, torch.Tensor]  # [n, d_out]
    radii: dict[int, torch.Tensor]  # [n]
    labels: dict[int, torch.Tensor]  # [n] token ids

    def memory_edit(self, lm, requests: list | None = None, hparams=None) -> MemoryEdit:
        """The codebook as an applicable edit on ``lm``."""
        (layer,) = self.keys
        return MemoryEdit.build(lm, "grace", [lm.adapter.w_out_name(layer)],
                                {"keys": self.keys[layer], "values": self.values[layer],
                                 "radii": self.radii[layer], "labels": self.labels[layer]},
                                {"layer": layer}, method="grace", requests=requests, hparams=hparams)


def distances(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Euclidean distances [m, n] between queries [m, d] and keys [n, d] (float32).

    Computed in float64: in float32 the expanded form's rounding leaves a key ~1e-3 from itself
    at Gemma's scale (2048-d keys of norm ~4), more than the "same input again" tolerance."""
    q, keys = q.double(), keys.double()
    d2 = (q * q).sum(-1)[:, None] + (keys * keys).sum(-1)[None, :] - 2.0 * q @ keys.T
    return d2.clamp_min(0.0).sqrt().float()


def replace(x: torch.Tensor, y: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
            radii: torch.Tensor) -> torch.Tensor:
    """``y`` ([..., d_out], W_out's output for inputs ``x`` [..., d_in]) with every position whose
    input lies within the radius of its nearest key replaced by that key's value."""
    if keys.shape[0] == 0:
        return y
    q = x.reshape(-1, x.shape[-1])
    dist, idx = distances(q, keys).min(1)
    hit = dist <= radii[idx]
    if not bool(hit.any()):
        return y
    flat = y.reshape(-1, y.shape[-1])
    out = torch.where(hit[:, None], values[idx].to(flat.dtype), flat)
    return out.view_as(y)


def _install(model, edit: MemoryEdit, active):
    mod = model.get_submodule(edit.sites[0])
    dev = next(model.parameters()).device
    d_in, d_out = linear_dims(mod)
    n = memory_tensor(edit, "keys", (None, d_in)).shape[0]
    keys, values, radii = (memory_tensor(edit, k, s).to(dev)
                           for k, s in (("keys", (n, d_in)), ("values", (n, d_out)), ("radii", (n,))))
    return [output_hook(mod, active, lambda x, y: replace(x, y, keys, values, radii))]


register_memory("grace", _install)


def _empty(lm, layer: int) -> GraceState:
    d_out, d_in = lm.adapter.w_out_dims(layer)
    return GraceState({layer: torch.zeros(0, d_in)}, {layer: torch.zeros(0, d_out)}, {layer: torch.zeros(0)},
                      {layer: torch.zeros(0, dtype=torch.long)})


def _write_keys(cb: dict[str, torch.Tensor], queries: torch.Tensor, warm: torch.Tensor, labels: list[int],
                eps: float) -> list[int]:
    """Update the codebook ``cb`` (keys, values, radii, labels) for one edit's queries [m, d_in];
    returns the entry each query uses."""
    used = []
    for q, v, lab in zip(queries, warm, labels):
        n = cb["keys"].shape[0]
        if n:
            dist, k = distances(q[None], cb["keys"])[0].min(0)
            d, k = float(dist), int(k)
        if n and d <= eps + float(cb["radii"][k]):
            if d <= 1e-3 * eps:  # the same input again: the newest edit's label wins
                cb["labels"][k] = lab
                used.append(k)
                continue
            if int(cb["labels"][k]) == lab:
                cb["radii"][k] = max(float(cb["radii"][k]), d)  # widen to cover the query
                used.append(k)
                continue
            cb["radii"][k] = d / 2  # conflict: split the distance between the two entries
            new_eps = d / 2
        else:
            new_eps = eps
        cb["keys"] = torch.cat([cb["keys"], q[None].float()])
        cb["values"] = torch.cat([cb["values"], v[None].float()])
        cb["radii"] = torch.cat([cb["radii"], torch.tensor([new_eps])])
        cb["labels"] = torch.cat([cb["labels"], torch.tensor([lab])])
        used.append(n)
    return used


def _optimise_values(lm, tail: Tail, cb: dict[str, torch.Tensor], used: list[int], hp: GraceHparams) -> list[float]:
    """Adam on the values of entries ``used`` until the edit's target NLL is below ``nll_stop``."""
    dev = lm.device
    idx = torch.tensor(sorted(set(used)), device=dev)
    keys, radii = cb["keys"].to(dev), cb["radii"].to(dev)
    frozen = cb["values"].to(dev)
    train = frozen[idx].clone().requires_grad_(True)
    scale = float(train.detach().pow(2).mean().sqrt().clamp_min(1e-6))  # RMS of the layer's output there
    opt = torch.optim.Adam([train], lr=hp.lr * scale)
    mod = lm.adapter.w_out(tail.layer)
    history = []
    for it in range(hp.n_iter + 1):
        values = frozen.index_copy(0, idx, train)
        handle = output_hook(mod, lambda: True, lambda x, y: replace(x, y, keys, values, radii))
        try:
            loss = tail.nll().mean()
        finally:
            handle.remove()
        history.append(float(loss.detach()))
        if history[-1] < hp.nll_stop or it == hp.n_iter:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    cb["values"][idx.cpu()] = train.detach().cpu()
    return history


def compute_grace(lm, requests: list[EditRequest], hp: GraceHparams, resources: Resources,
                  state: GraceState | None = None) -> EditOutcome:
    """Write the requests, one after another, into the codebook (``state``'s, or a new one)."""
    t0 = time.perf_counter()
    validate_for_tokenizer(lm.tokenizer, requests, lm.model)
    (layer,) = hp.layers
    state = state or _empty(lm, layer)
    if set(state.keys) != {layer}:
        raise FeditError(f"the GRACE codebook carried over is at layer {sorted(state.keys)}, these hyperparameters "
                         f"edit layer {layer}.", "keep the layer of the sequential run's first batch.")
    cb = {k: getattr(state, k)[layer].clone() for k in ("keys", "values", "radii", "labels")}
    targets = []
    for r in requests:
        tail = Tail(lm, target_rows(lm.tokenizer, [r.filled_prompt], [r.target_new]), layer,
                    vocab_subset=hp.vocab_subset, vocab_refresh=hp.vocab_refresh)
        P, ti = len(encode(lm.tokenizer, r.filled_prompt)), target_ids(lm.tokenizer, r.target_new)
        pos = list(range(P - 1, P - 1 + len(ti)))
        used = _write_keys(cb, tail.w_in[0, pos].float().cpu(), tail.w_out[0, pos].float().cpu(), ti, hp.eps)
        history = _optimise_values(lm, tail, cb, used, hp)
        targets.append({"case_id": r.case_id, "nll_start": history[0], "nll_end": history[-1],
                        "steps": len(history) - 1, "entries": sorted(set(used))})
    new = GraceState(*({layer: cb[k]} for k in ("keys", "values", "radii", "labels")))
    log.info("GRACE: %d requests written, codebook of %d entries", len(requests), cb["keys"].shape[0])
    return EditOutcome(deltas=new.memory_edit(lm, requests, hp), targets=targets, seconds=time.perf_counter() - t0,
                       state=new, diagnostics={"entries": int(cb["keys"].shape[0])})


register(Method("grace", GraceHparams, compute_grace, stateful=True, state_class=GraceState, family="memory-based",
                writes_weights=False, federates="codebook", description="codebook of key -> value replacements at one layer with deferral radii (lifelong)"))
