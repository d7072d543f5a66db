"""Target-vector optimisation: the z of MEMIT, the v* of ROME (FLEKE's "MKV").

A vector δ is added at the subject's last token at one site (the output of W_out for ROME, the
output of a block for MEMIT) and optimised so that every rewriting prompt continues with the
new target, while the model's distribution on "{subject} is a" stays put (KL term) and δ stays
small (weight decay, norm clamp). The result is z = h + δ.

Cost: only δ requires grad, so no weight gradients are formed and autograd only records the
blocks above the site. After the first step, the blocks below the site are not run again:
their output is cached and the upper blocks are re-run with the arguments each got the first
time (``hooks.record_block_calls``). Logits are formed only at target and KL positions.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from fedit.core.hooks import call_block, capture, edit_output, record_block_calls
from fedit.core.tokens import last_token_of_span, pad, pad_id, subject_batch, target_ids
from fedit.requests import EditRequest

log = logging.getLogger(__name__)

Site = Literal["w_out", "block"]


@dataclass(frozen=True)
class TargetConfig:
    layer: int
    site: Site
    steps: int = 25
    lr: float = 0.5
    clamp: float = 4.0  # ‖δ‖ ≤ clamp · ‖h‖
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    nll_stop: float = 0.05
    kl_prompt: str = "{} is a"
    reuse_lower: bool = True  # cache the blocks below the site after the first step


@dataclass
class TargetResult:
    z: torch.Tensor  # [d] target at the site
    h: torch.Tensor  # [d] the site's value before the edit (bare prompt)
    nll_start: float
    nll_end: float
    steps: int
    seconds: float
    history: list[float] = field(default_factory=list)

    @property
    def delta(self) -> torch.Tensor:
        return self.z - self.h


def _site_module(lm, cfg: TargetConfig):
    name = lm.adapter.w_out_name(cfg.layer) if cfg.site == "w_out" else lm.adapter.block_name(cfg.layer)
    return lm.adapter.module(name)


def compute_target(lm, request: EditRequest, templates: list[str], cfg: TargetConfig) -> TargetResult:
    """Optimise δ for one request (see :func:`compute_targets`)."""
    return compute_targets(lm, [request], templates, cfg)[0]


def compute_targets(lm, requests: list[EditRequest], templates: list[str], cfg: TargetConfig,
                    batch_size: int = 16) -> list[TargetResult]:
    """Optimise one δ per request, ``batch_size`` requests per forward pass.

    ``templates[0]`` must be the bare ``"{}"`` template. Requests in a batch are independent:
    each has its own rows, its own δ, its own early stop and norm clamp, and Adam acts per
    coordinate, so the result is the same as optimising them one at a time (up to float
    noise). The model is not changed.
    """
    out: list[TargetResult] = []
    for s in range(0, len(requests), max(1, batch_size)):
        out.extend(_optimise(lm, requests[s:s + batch_size], templates, cfg))
    return out


def _optimise(lm, requests: list[EditRequest], templates: list[str], cfg: TargetConfig) -> list[TargetResult]:
    t0 = time.perf_counter()
    tok, ad, dev = lm.tokenizer, lm.adapter, lm.device
    n, R = len(requests), len(templates)
    tgts = [target_ids(tok, r.target_new) for r in requests]

    # Rows: per request, every template + prompt + target[:-1]; then one KL row per request.
    rw = subject_batch(tok, templates, requests, suffix_ids=[t[:-1] for t in tgts])
    seqs = [row[: int(k)].tolist() for row, k in zip(rw.input_ids, rw.lengths)]
    lookup = rw.lookup.tolist()
    kl_cols = []
    for r in requests:
        kl_ids, kl_idx = last_token_of_span(tok, r.subject.join(cfg.kl_prompt.split("{}", 1)),
                                            cfg.kl_prompt.index("{}") + len(r.subject))
        seqs.append(kl_ids)
        lookup.append(kl_idx)
        kl_cols.append(len(kl_ids) - 1)
    ids, mask = pad(seqs, pad_id(tok))
    ids, mask = ids.to(dev), mask.to(dev)
    owner = torch.cat([torch.arange(n).repeat_interleave(R), torch.arange(n)]).to(dev)  # request of each row
    lookup_t = torch.tensor(lookup, device=dev)

    # Positions whose logits predict target tokens: prompt length P, target token j at P-1+j.
    rows, cols, toks, weight, req_of = [], [], [], [], []
    for i, t in enumerate(tgts):
        m = len(t)
        for r in range(i * R, (i + 1) * R):
            P = len(seqs[r]) - (m - 1)
            rows += [r] * m
            cols += list(range(P - 1, P - 1 + m))
            toks += t
            weight += [1.0 / (m * R)] * m  # mean over tokens, then over templates
            req_of += [i] * m
    rows, cols, toks = (torch.tensor(x, device=dev) for x in (rows, cols, toks))
    weight, req_of = torch.tensor(weight, device=dev), torch.tensor(req_of, device=dev)
    kl_rows = torch.arange(n * R, n * R + n, device=dev)
    kl_cols_t = torch.tensor(kl_cols, device=dev)

    site = _site_module(lm, cfg)
    onehot = torch.zeros(ids.shape[0], ids.shape[1], 1, device=dev)
    onehot[torch.arange(ids.shape[0], device=dev), lookup_t] = 1.0

    # Initial values at the site (bare prompt = first row of each request), unedited KL targets.
    blocks = list(ad.blocks())
    start = cfg.layer  # first block whose output depends on δ
    with torch.no_grad(), capture({"site": site, "start": blocks[start]}, inputs=True) as st, \
            record_block_calls(blocks) as calls:
        final = ad.body()(input_ids=ids, attention_mask=mask).last_hidden_state
    bare = torch.arange(n, device=dev) * R
    h = st["site"]["output"][bare, lookup_t[bare]].float().clone()  # [n, d]
    start_input = st["start"]["input"]
    with torch.no_grad():
        kl_init = F.log_softmax(ad.logits(final[kl_rows, kl_cols_t]).float(), -1)  # [n, V]

    delta = torch.zeros_like(h, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    h_norm = h.norm(dim=-1)  # [n]
    max_norm = cfg.clamp * h_norm

    def add_delta(out):
        return out + (onehot * delta[owner][:, None, :]).to(out.dtype)

    def forward_final() -> torch.Tensor:
        with edit_output(site, add_delta):
            if cfg.reuse_lower:
                x = start_input
                for j in range(start, len(blocks)):
                    x = call_block(blocks[j], calls[j], x)
                return ad.final_norm()(x)
            return ad.body()(input_ids=ids, attention_mask=mask).last_hidden_state

    active = torch.ones(n, dtype=torch.bool, device=dev)
    history: list[list[float]] = [[] for _ in range(n)]
    steps = torch.zeros(n, dtype=torch.long)
    for it in range(cfg.steps + 1):
        final = forward_final()
        logp = F.log_softmax(ad.logits(final[rows, cols]).float(), -1)  # [N, V]
        tok_nll = -logp.gather(1, toks[:, None])[:, 0] * weight
        nll = torch.zeros(n, device=dev).index_add(0, req_of, tok_nll)  # [n]
        kl_logp = F.log_softmax(ad.logits(final[kl_rows, kl_cols_t]).float(), -1)
        kl = (kl_init.exp() * (kl_init - kl_logp)).sum(-1)  # KL(P_orig ‖ P_δ), [n]
        wd = cfg.weight_decay * delta.norm(dim=-1) / h_norm ** 2
        loss = nll + cfg.kl_factor * kl + wd
        for i in torch.nonzero(active).flatten().tolist():
            history[i].append(float(nll[i].detach()))
        active &= nll.detach() >= cfg.nll_stop
        if it == cfg.steps or not bool(active.any()):
            break
        frozen = delta.detach().clone()
        opt.zero_grad()
        (loss * active).sum().backward()
        opt.step()
        steps += active.cpu().long()
        with torch.no_grad():
            delta[~active] = frozen[~active]  # stopped requests keep their δ (Adam's momentum aside)
            norms = delta.norm(dim=-1)
            over = norms > max_norm
            delta[over] *= (max_norm[over] / norms[over])[:, None]
    seconds = (time.perf_counter() - t0) / n
    z = (h + delta).detach()
    return [TargetResult(z=z[i], h=h[i], nll_start=history[i][0], nll_end=history[i][-1], steps=int(steps[i]),
                         seconds=seconds, history=history[i]) for i in range(n)]
