"""Carry a wanted change of the residual stream at layer L back to an earlier layer l.

MEMIT assumes the residual stream is a sum, so a change written at layer l arrives unchanged
at the last edited layer L. In models with norms around each sublayer (Gemma 2/3) the blocks
between l and L react to the change and it arrives bent: on Gemma 3 270M the residual at L grew
after each lower layer's update. Here we find, per request, the change Δ of block l's output
at the subject's last token whose effect at block L's output is the wanted one:

    min_Δ ‖h_L(h_l + Δ) − (h_L + want)‖²

starting from Δ = want (MEMIT's own assumption) and improving it with a few Adam steps through
blocks l+1..L only (the rest of the sequence is cached).
"""

from __future__ import annotations

import torch

from fedit.core import prefix
from fedit.core.hooks import call_block, capture, record_block_calls, run_until_stop
from fedit.core.tokens import subject_batch
from fedit.requests import EditRequest


def pull_back(lm, requests: list[EditRequest], layer: int, last: int, want: torch.Tensor,
              steps: int = 30, lr_scale: float = 0.1, suffix: bool = True) -> tuple[torch.Tensor, float, float]:
    """Δ [n, d] at block ``layer``'s output that moves block ``last``'s output by ``want`` [n, d].

    Returns (Δ, relative error at Δ = want, relative error at the returned Δ), the error being
    ‖achieved − want‖ / ‖want‖ at the subject's last token of the bare prompt, averaged over
    requests. The model is not changed. ``suffix=False`` runs every column of the prompt through
    the blocks on every step (the same result, slower).
    """
    ad = lm.adapter
    blocks = list(ad.blocks())
    batch = subject_batch(lm.tokenizer, ["{}"], requests).to(lm.device)
    rows = torch.arange(len(requests), device=lm.device)
    with torch.no_grad(), record_block_calls(blocks) as calls, \
            capture({"l": blocks[layer], "L": blocks[last]}, stop_when_done=True) as st:
        run_until_stop(lambda: ad.body()(input_ids=batch.input_ids, attention_mask=batch.attention_mask))
    h_l = st["l"]["output"]  # [n, T, d]
    goal = st["L"]["output"][rows, batch.lookup].float() + want.float()  # [n, d]
    onehot = torch.zeros(h_l.shape[0], h_l.shape[1], 1, device=lm.device)
    onehot[rows, batch.lookup] = 1.0
    want_norm = want.float().norm(dim=-1).clamp_min(1e-12)

    # Only the columns from the subject's last token on see Δ: with a suffix plan the blocks run
    # those alone, attending to the rest as recorded (core.prefix); the same numbers either way.
    cfg_m = getattr(lm.model, "config", None)
    plan = None
    if suffix and last > layer:
        try:
            plan = prefix.plan(blocks, calls, layer + 1, h_l, batch.lookup, batch.attention_mask.sum(-1),
                               getattr(cfg_m, "_attn_implementation", None), getattr(cfg_m, "sliding_window", None),
                               end=last + 1)
        except (RuntimeError, TypeError, ValueError, KeyError, IndexError):  # an unusual block: full prompts
            plan = None

    def rel_error(delta: torch.Tensor) -> torch.Tensor:  # [n]
        if plan is not None:
            x = plan.hidden.clone()
            x[:, 0] = x[:, 0] + delta.to(x.dtype)
            x = prefix.run(blocks, plan, layer + 1, x, plan.named, plan.kv)
            return (x[:, 0].float() - goal).norm(dim=-1) / want_norm
        x = h_l + (onehot * delta[:, None, :]).to(h_l.dtype)
        for j in range(layer + 1, last + 1):
            x = call_block(blocks[j], calls[j], x)
        return (x[rows, batch.lookup].float() - goal).norm(dim=-1) / want_norm

    # Δ = want + s·u with s = rms of the request's own want: Adam moves each coordinate of u by
    # ~lr_scale, so each request's Δ moves by ~lr_scale·s whatever else is in the batch (a
    # request's result must not depend on its batch: federated clients sum per-fact results).
    start = want.detach().float()
    s = start.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)  # [n, 1]
    u = torch.zeros_like(start, requires_grad=True)
    opt = torch.optim.Adam([u], lr=lr_scale)
    best, best_err, err0 = start.clone(), None, None
    math = suffix and lm.device.type == "cpu"  # the math attention kernel, as the target loop's speed-ups
    for it in range(steps + 1):
        delta = start + s * u
        with prefix.math_kernel(math):
            err = rel_error(delta)
        e = err.detach()
        if best_err is None:
            err0, best_err = float(e.mean()), e.clone()
        better = e < best_err
        best = torch.where(better[:, None], delta.detach(), best)
        best_err = torch.minimum(best_err, e)
        if it == steps:
            break
        opt.zero_grad()
        with prefix.math_kernel(math):
            err.pow(2).sum().backward()
        opt.step()
    return best, err0, float(best_err.mean())
