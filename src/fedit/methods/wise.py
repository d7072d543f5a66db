"""WISE (Wang et al. 2024): a side memory of one FFN output weight holds the edits; a router
decides, per input, between the main weight and the side memories. Lifelong; base weights
never change.

At layer ``L`` the side memory is ``W_side = W_out + Δ``. An input's activation score for a
side memory is ``‖a(x) Δᵀ‖`` (``a``: W_out's input, the MLP activation), averaged over the
input's tokens. At inference the side memory with the highest score answers if that score
exceeds ``act_ratio`` × the smallest score an edit reached when it was written; otherwise the
main weight does. In generation the choice made on the prompt is kept for the later tokens.

Writing an edit: the current shard's ``Δ`` is trained by SGD (gradients masked to a random
subset of ``mask_ratio`` of its entries, drawn per shard; entries clamped to ±``norm_constraint``)
on the NLL of the target after the prompt through the side weight, plus WISE's margin losses on
scores: the edit's above ``beta``, an irrelevant text's (a line of the statistics corpus) below
``alpha``, and the gap between them above ``gamma``. After ``save_freq`` edits the shard is
closed and a new one (with a new mask) starts; every ``merge_freq`` edits the closed shards
(and the previous merged memory) are merged with TIES into one. The memories and the threshold
are the method's state across sequential batches and the tensors of its
:class:`~fedit.memory.MemoryEdit`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from fedit.core.tokens import validate_for_tokenizer
from fedit.corpus import open_corpus
from fedit.errors import FeditError, HparamsError
from fedit.memory import MemoryEdit, linear_dims, memory_number, memory_tensor, register_memory
from fedit.methods import Method, register
from fedit.methods.base import EditOutcome, Resources
from fedit.methods.hparams import check_vocab_subset
from fedit.methods.tail import Tail, target_rows
from fedit.requests import EditRequest

log = logging.getLogger(__name__)


@dataclass
class WiseHparams:
    layers: list[int]  # exactly one: the layer whose W_out gets a side memory
    n_iter: int = 70  # maximal SGD steps per edit
    lr: float = 1.0
    mask_ratio: float = 0.2  # share of the side weight's entries a shard may write
    norm_constraint: float = 1.0  # |Δ| per entry
    alpha: float = 5.0  # irrelevant inputs' score is pushed below alpha
    beta: float = 20.0  # the edit's score is pushed above beta
    gamma: float = 10.0  # and above the irrelevant score by gamma
    act_ratio: float = 0.88  # routing threshold: act_ratio x the smallest edit score
    save_freq: int = 500  # edits per shard
    merge_freq: int = 1000  # edits between TIES merges (a multiple of save_freq)
    density: float = 0.53  # TIES density
    nll_stop: float = 0.01  # stop once the target NLL is below this and every margin is met
    seed: int = 0  # of the shards' masks
    irrelevant_len: int = 24  # tokens of each irrelevant text
    # Between every vocab_refresh-th step the target NLL reads only a candidate vocabulary of
    # the top vocab_subset tokens per position (methods.tail.Tail); 0: every step exact
    vocab_subset: int = 0
    vocab_refresh: int = 5

    def __post_init__(self):
        if len(self.layers) != 1:
            raise HparamsError(f"WISE keeps its side memory at one layer, got layers {self.layers}.",
                               "pass one layer, e.g. --layers 13.")
        if not 0 < self.mask_ratio <= 1 or self.save_freq < 1 or self.merge_freq % self.save_freq:
            raise HparamsError(f"WISE needs 0 < mask_ratio <= 1 and merge_freq a multiple of save_freq; got "
                               f"mask_ratio {self.mask_ratio}, save_freq {self.save_freq}, merge_freq {self.merge_freq}.",
                               "e.g. mask_ratio 0.2, save_freq 500, merge_freq 1000.")
        check_vocab_subset(self.vocab_subset, self.vocab_refresh)


@dataclass
class WiseState:
    """Side memories so far (by index: 0 = merged, then closed shards, the last = current shard)
    and what routing needs; what a sequential batch continues."""

    memories: dict[int, torch.Tensor]  # each Δ [d_out, d_in] (math layout)
    mask: dict[int, torch.Tensor]  # {0: bool [d_out, d_in]} the current shard's writable entries
    layer: int
    edits: int  # edits written so far
    min_act: float  # smallest in-scope score of an edit when it was written
    merged: bool  # whether memories[0] is a merged memory (else it is a shard)
    act_ratio: float  # routing threshold = act_ratio x min_act

    def memory_edit(self, lm, requests: list | None = None, hparams=None) -> MemoryEdit:
        live = [d for d in self.memories.values() if bool(d.any())]
        stack = torch.stack(live) if live else torch.zeros(0, *lm.adapter.w_out_dims(self.layer))
        return MemoryEdit.build(lm, "wise", [lm.adapter.w_out_name(self.layer), lm.adapter.body_name()],
                                {"memories": stack}, {"threshold": self.act_ratio * self.min_act},
                                method="wise", requests=requests, hparams=hparams)


def scores(x: torch.Tensor, deltas: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Activation scores [B, m]: mean over each row's tokens of ‖x Δᵀ‖ for each memory.

    ``x`` [B, T, d_in], ``deltas`` [m, d_out, d_in], ``mask`` [B, T] (None: every token)."""
    per_tok = torch.einsum("btk,mok->btmo", x.float(), deltas.float()).norm(dim=-1)  # [B, T, m]
    w = torch.ones(x.shape[:2], device=x.device) if mask is None else mask.to(x.device).float()
    return (per_tok * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)


def _install(model, edit: MemoryEdit, active):
    w_out, body = (model.get_submodule(s) for s in edit.sites)
    dev = next(model.parameters()).device
    d_in, d_out = linear_dims(w_out)
    mem = memory_tensor(edit, "memories", (None, d_out, d_in)).to(dev)  # [m, d_out, d_in]
    thr = memory_number(edit, "threshold")
    seen: dict[str, torch.Tensor | None] = {"mask": None, "choice": None, "new": True}

    def pre(mod, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        mask = kwargs.get("attention_mask")
        seen["mask"] = mask if mask is not None and mask.dim() == 2 else None
        seen["new"] = past == 0

    def hook(mod, args, kwargs, out):
        if not active() or mem.shape[0] == 0:
            return None
        x = args[0] if args else next(iter(kwargs.values()))  # [B, T, d_in]
        if seen["new"] or seen["choice"] is None or seen["choice"].shape[0] != x.shape[0]:
            m = seen["mask"]
            m = m[:, -x.shape[1]:] if m is not None and m.shape[1] >= x.shape[1] else None
            s = scores(x, mem, m)  # [B, m]
            best, which = s.max(1)
            seen["choice"] = torch.where(best > thr, which, torch.full_like(which, -1))  # -1: main weight
        choice = seen["choice"]
        if bool((choice < 0).all()):
            return None
        side = torch.einsum("btk,bok->bto", x, mem[choice.clamp_min(0)].to(x.dtype))  # x Δᵀ per row
        return out + side * (choice >= 0).to(out.dtype)[:, None, None]

    return [body.register_forward_pre_hook(pre, with_kwargs=True),
            w_out.register_forward_hook(hook, with_kwargs=True)]


register_memory("wise", _install)


def _new_mask(shape, ratio: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < ratio


def _empty(lm, hp: WiseHparams) -> WiseState:
    (layer,) = hp.layers
    shape = lm.adapter.w_out_dims(layer)
    return WiseState(memories={0: torch.zeros(shape)}, mask={0: _new_mask(shape, hp.mask_ratio, hp.seed)},
                     layer=layer, edits=0, min_act=float("inf"), merged=False, act_ratio=hp.act_ratio)


def _irrelevant(lm, resources: Resources, hp: WiseHparams, n: int) -> list[list[int]]:
    chunks = []
    for c in open_corpus(resources.corpus).chunks(lm.tokenizer, hp.irrelevant_len):
        chunks.append(c)
        if len(chunks) >= n:
            break
    return chunks


def _train_edit(lm, r: EditRequest, irrelevant: list[int], delta: torch.Tensor, mask: torch.Tensor,
                hp: WiseHparams) -> tuple[float, list[float]]:
    """SGD on ``delta`` (in place, entries of ``mask`` only) for one edit; returns (its score, NLLs)."""
    tok, ad, dev = lm.tokenizer, lm.adapter, lm.device
    layer = hp.layers[0]
    rows = target_rows(tok, [r.filled_prompt], [r.target_new])
    # one more row: the irrelevant text (its NLL is not scored: pair index 0 only)
    ids = torch.full((2, max(rows.ids.shape[1], len(irrelevant))), int(rows.ids[0, -1]), dtype=torch.long)
    mask_rows = torch.zeros_like(ids)
    ids[0, :rows.ids.shape[1]], mask_rows[0, :rows.ids.shape[1]] = rows.ids[0], rows.mask[0]
    ids[1, :len(irrelevant)], mask_rows[1, :len(irrelevant)] = torch.tensor(irrelevant), 1
    rows.ids, rows.mask = ids, mask_rows
    tail = Tail(lm, rows, layer, vocab_subset=hp.vocab_subset, vocab_refresh=hp.vocab_refresh)
    d = delta.to(dev).clone().requires_grad_(True)
    m = mask.to(dev)
    opt = torch.optim.SGD([d], lr=hp.lr, weight_decay=1e-5)
    w_out = ad.w_out(layer)
    tok_mask = tail.r.mask.float()  # [2, T]
    history: list[float] = []
    in_act = 0.0
    for it in range(hp.n_iter + 1):
        def add_side(mod, args, out):
            return out + torch.einsum("btk,ok->bto", args[0], d).to(out.dtype)

        handle = w_out.register_forward_hook(add_side)
        try:
            nll = tail.nll()[0]
        finally:
            handle.remove()
        act = scores(tail.w_in, d[None], tok_mask)[:, 0]  # [2]: the edit's, the irrelevant text's
        in_act, out_act = act[0], act[1]
        margin = (torch.relu(out_act - hp.alpha) + torch.relu(hp.beta - in_act)
                  + torch.relu(out_act - in_act + hp.gamma))
        history.append(float(nll.detach()))
        if (history[-1] < hp.nll_stop and float(margin.detach()) == 0.0) or it == hp.n_iter:
            break
        opt.zero_grad()
        (nll + margin).backward()
        with torch.no_grad():
            d.grad *= m
        opt.step()
        with torch.no_grad():
            d.clamp_(-hp.norm_constraint, hp.norm_constraint)
    delta.copy_(d.detach().cpu())
    return float(in_act.detach()), history


def compute_wise(lm, requests: list[EditRequest], hp: WiseHparams, resources: Resources,
                 state: WiseState | None = None) -> EditOutcome:
    """Write the requests, one after another, into the side memory (``state``'s, or a new one)."""
    t0 = time.perf_counter()
    validate_for_tokenizer(lm.tokenizer, requests, lm.model)
    st = state or _empty(lm, hp)
    if st.layer != hp.layers[0]:
        raise FeditError(f"the WISE memory carried over is at layer {st.layer}, these hyperparameters edit layer "
                         f"{hp.layers[0]}.", "keep the layer of the sequential run's first batch.")
    mems = {k: v.clone() for k, v in st.memories.items()}
    mask, edits, min_act, merged = st.mask[0].clone(), st.edits, st.min_act, st.merged
    irr = _irrelevant(lm, resources, hp, 16)
    targets = []
    for r in requests:
        cur = max(mems)
        act, history = _train_edit(lm, r, irr[edits % len(irr)], mems[cur], mask, hp)
        min_act = min(min_act, act)
        edits += 1
        targets.append({"case_id": r.case_id, "nll_start": history[0], "nll_end": history[-1],
                        "steps": len(history) - 1, "score": act})
        if edits % hp.merge_freq == 0:  # close the shard and merge every closed one (and the merged memory)
            from fedit.collab.merge import ties  # (fedit.collab imports the evaluation runner, which imports methods)

            parts = [mems[k] for k in sorted(mems) if bool(mems[k].any())]
            mems = {0: ties([{0: p} for p in parts], density=hp.density, scale=1.0)[0].float()}
            mems[1] = torch.zeros_like(mems[0])
            merged = True
            mask = _new_mask(mask.shape, hp.mask_ratio, hp.seed + edits)
        elif edits % hp.save_freq == 0:  # close the shard, start a new one with a new mask
            mems[cur + 1] = torch.zeros_like(mems[cur])
            mask = _new_mask(mask.shape, hp.mask_ratio, hp.seed + edits)
    new = WiseState(memories=mems, mask={0: mask}, layer=hp.layers[0], edits=edits, min_act=min_act, merged=merged,
                    act_ratio=hp.act_ratio)
    log.info("WISE: %d requests written (%d in all), threshold %.3f", len(requests), edits, hp.act_ratio * min_act)
    return EditOutcome(deltas=new.memory_edit(lm, requests, hp), targets=targets, seconds=time.perf_counter() - t0,
                       state=new, diagnostics={"edits": edits, "threshold": hp.act_ratio * min_act})


register(Method("wise", WiseHparams, compute_wise, stateful=True, state_class=WiseState, family="memory-based",
                writes_weights=False, description="side copy of one FFN weight with a router and sharded, merged edits (lifelong)"))
