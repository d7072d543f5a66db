"""Cross-entropy over a large vocabulary without forming the logits in float32 all at once.

A target optimisation reads, on every step, the log-probability of each target token and the
KL divergence of the KL prompt's next-token distribution from the unedited one, at ~100
positions over Gemma 3's 262k-token vocabulary. Forming those logits as one float32 [N, V]
tensor, its log-softmax, the gather and their backward passes writes and reads ~100 MB
several times per step; here the vocabulary is walked in chunks that stay in cache:

    loss_i = logsumexp(z_i) − Σ_v t_iv z_iv,        z_i = W h_i

with ``t_i`` the one-hot of a token (the token's negative log-probability) or a distribution
(``p0``: the cross-entropy, i.e. KL(p0 ‖ softmax(z)) plus p0's entropy). The backward pass
recomputes each chunk's logits and adds (softmax(z) − t) W to the gradient of h. The numbers
are those of ``log_softmax`` over the whole row in float32, the logits rounded to ``W``'s
dtype first exactly as a product in that dtype rounds them.
"""

from __future__ import annotations

import torch

CHUNK = 16384


def _chunk_logits(hc: torch.Tensor, W: torch.Tensor, v0: int, chunk: int) -> torch.Tensor:
    return (hc @ W[v0:v0 + chunk].T).float()


class _SoftCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, tok, soft, chunk):
        hc = h.detach().to(W.dtype)
        N, V = h.shape[0], W.shape[0]
        dev = h.device
        hard = tok >= 0
        soft_rows = torch.nonzero(~hard).flatten()
        hard_rows = torch.nonzero(hard).flatten()
        m = torch.full((N,), -torch.inf, device=dev)
        s = torch.zeros(N, device=dev)
        tgt = torch.zeros(N, device=dev)
        for v0 in range(0, V, chunk):
            z = _chunk_logits(hc, W, v0, chunk)
            new_m = torch.maximum(m, z.max(1).values)
            s = s * torch.exp(m - new_m) + torch.exp(z - new_m[:, None]).sum(1)
            m = new_m
            c = z.shape[1]
            inside = hard_rows[(tok[hard_rows] >= v0) & (tok[hard_rows] < v0 + c)]
            if len(inside):
                tgt[inside] += z[inside, tok[inside] - v0]
            if len(soft_rows):
                tgt[soft_rows] += (soft[:, v0:v0 + c] * z[soft_rows]).sum(1)
        lse = m + torch.log(s)
        ctx.save_for_backward(h, W, tok, soft, lse)
        ctx.chunk = chunk
        return lse - tgt

    @staticmethod
    def backward(ctx, g):
        h, W, tok, soft, lse = ctx.saved_tensors
        chunk = ctx.chunk
        hc = h.detach().to(W.dtype)
        hard = tok >= 0
        soft_rows = torch.nonzero(~hard).flatten()
        hard_rows = torch.nonzero(hard).flatten()
        grad = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        for v0 in range(0, W.shape[0], chunk):
            z = _chunk_logits(hc, W, v0, chunk)
            c = z.shape[1]
            p = torch.exp(z - lse[:, None])
            inside = hard_rows[(tok[hard_rows] >= v0) & (tok[hard_rows] < v0 + c)]
            if len(inside):
                p[inside, tok[inside] - v0] -= 1.0
            if len(soft_rows):
                p[soft_rows] -= soft[:, v0:v0 + c]
            p *= g[:, None]
            grad += (p.to(W.dtype) @ W[v0:v0 + c]).float()
        return grad.to(h.dtype), None, None, None, None


def soft_cross_entropy(h: torch.Tensor, W: torch.Tensor, tok: torch.Tensor, soft: torch.Tensor | None = None,
                       chunk: int = CHUNK) -> torch.Tensor:
    """Per row of ``h`` [N, d]: logsumexp(W h) − (W h)[tok] where ``tok`` [N] ≥ 0, and
    logsumexp(W h) − Σ soft · (W h) for the rows where ``tok`` is −1, in order (``soft`` [k, V],
    one distribution per such row). Differentiable in ``h`` only; [N] float32."""
    if soft is None:
        soft = torch.zeros(0, W.shape[0], device=h.device)
    if int((tok < 0).sum()) != soft.shape[0]:
        raise ValueError(f"{int((tok < 0).sum())} rows without a token but {soft.shape[0]} distributions")
    return _SoftCE.apply(h, W, tok, soft.float(), chunk)


# --- a candidate vocabulary between exact steps -----------------------------------------------
# An optimisation that reads a few positions' log-probabilities over the whole vocabulary on
# every step spends most of its projection on tokens whose probability hardly moves. On an exact
# step the loss is formed over the whole vocabulary and a candidate set is chosen: the top ``k``
# tokens of every row (and any tokens the caller must have, e.g. the targets); the log Σ exp of
# the logits outside the set is frozen there. The steps until the next exact one form logits for
# the candidates only and normalise with the frozen rest. At an exact step the numbers are those
# of the full log-softmax; in between, only the tokens outside the set are approximated, by their
# values at the last exact step.


def candidate_vocab(logits: torch.Tensor, k: int, *must: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(vocab [U] sorted token ids, tail [M]) from exact ``logits`` [M, V]: the top ``k`` of each
    row and every id in ``must``; ``tail`` is each row's log Σ exp over the tokens not chosen
    (−inf when every token is)."""
    V = logits.shape[-1]
    parts = [logits.topk(min(k, V), -1).indices.flatten(), *(m.flatten().to(logits.device) for m in must)]
    vocab = torch.unique(torch.cat(parts))  # sorted
    outside = torch.ones(V, dtype=torch.bool, device=logits.device)
    outside[vocab] = False
    tail = (torch.logsumexp(logits[:, outside], -1) if bool(outside.any())
            else torch.full((logits.shape[0],), -torch.inf, device=logits.device))
    return vocab, tail


def candidate_log_softmax(part: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [M, U] of the candidates from their logits ``part`` [M, U] and the frozen
    log Σ exp of the rest, ``tail`` [M] (see :func:`candidate_vocab`)."""
    part = part.float()
    return part - torch.logaddexp(torch.logsumexp(part, -1), tail)[:, None]
