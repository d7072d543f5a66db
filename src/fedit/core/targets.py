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
    """Optimise δ for one request. ``templates[0]`` must be the bare ``"{}"`` template.

    The model is not changed. Returns z (and the h it started from) at ``cfg.site``.
    """
    t0 = time.perf_counter()
    tok, ad, dev = lm.tokenizer, lm.adapter, lm.device
    tgt = target_ids(tok, request.target_new)
    m = len(tgt)

    # Rows: every template + prompt + target[:-1], then the KL prompt.
    rw = subject_batch(tok, templates, [request], suffix_ids=[tgt[:-1]])
    kl_text = request.subject.join(cfg.kl_prompt.split("{}", 1))
    kl_ids, kl_idx = last_token_of_span(tok, kl_text, cfg.kl_prompt.index("{}") + len(request.subject))
    seqs = [row[: int(n)].tolist() for row, n in zip(rw.input_ids, rw.lengths)] + [kl_ids]
    ids, mask = pad(seqs, pad_id(tok))
    ids, mask = ids.to(dev), mask.to(dev)
    lookup = torch.cat([rw.lookup, torch.tensor([kl_idx])]).to(dev)
    R = len(templates)
    # Positions whose logits predict target tokens: prompt length P, target token j at P-1+j.
    prompt_len = (rw.lengths - (m - 1)).to(dev)  # [R]
    rows = torch.arange(R, device=dev).repeat_interleave(m)
    cols = (prompt_len - 1).repeat_interleave(m) + torch.arange(m, device=dev).repeat(R)
    tgt_t = torch.tensor(tgt, device=dev).repeat(R)
    kl_row, kl_col = R, int(len(kl_ids) - 1)

    site = _site_module(lm, cfg)
    d = None
    onehot = torch.zeros(ids.shape[0], ids.shape[1], 1, device=dev)
    onehot[torch.arange(ids.shape[0], device=dev), lookup] = 1.0

    # Initial value at the site (bare prompt = row 0) and the unedited KL distribution.
    blocks = list(ad.blocks())
    start = cfg.layer  # first block whose output depends on δ
    with torch.no_grad(), capture({"site": site, "start": blocks[start]}, inputs=True) as st, \
            record_block_calls(blocks) as calls:
        final = ad.body()(input_ids=ids, attention_mask=mask).last_hidden_state
    h = st["site"]["output"][0, lookup[0]].clone()
    start_input = st["start"]["input"]
    d = h.shape[-1]
    with torch.no_grad():
        kl_init = F.log_softmax(ad.logits(final[kl_row, kl_col]).float(), -1)

    h = h.float()
    delta = torch.zeros(d, device=dev, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    h_norm = h.norm()
    max_norm = cfg.clamp * h_norm

    def add_delta(out):
        return out + (onehot * delta).to(out.dtype)

    def forward_final() -> torch.Tensor:
        with edit_output(site, add_delta):
            if cfg.reuse_lower:
                x = start_input
                for j in range(start, len(blocks)):
                    x = call_block(blocks[j], calls[j], x)
                return ad.final_norm()(x)
            return ad.body()(input_ids=ids, attention_mask=mask).last_hidden_state

    history: list[float] = []
    steps_run = 0
    for it in range(cfg.steps + 1):
        final = forward_final()
        logp = F.log_softmax(ad.logits(final[rows, cols]).float(), -1)  # [R*m, V]
        nll = -logp.gather(1, tgt_t[:, None]).reshape(R, m).mean(1).mean()
        kl_logp = F.log_softmax(ad.logits(final[kl_row, kl_col]).float(), -1)
        kl = F.kl_div(kl_logp, kl_init, log_target=True, reduction="sum")  # KL(P_orig ‖ P_δ)
        wd = cfg.weight_decay * delta.norm() / h_norm ** 2
        loss = nll + cfg.kl_factor * kl + wd
        history.append(float(nll.detach()))
        if history[-1] < cfg.nll_stop or it == cfg.steps:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps_run += 1
        with torch.no_grad():
            n = delta.norm()
            if n > max_norm:
                delta.mul_(max_norm / n)
    z = (h + delta).detach()
    return TargetResult(z=z, h=h.detach(), nll_start=history[0], nll_end=history[-1], steps=steps_run,
                        seconds=time.perf_counter() - t0, history=history)
