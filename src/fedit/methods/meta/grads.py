"""What meta-learned editors (MEND, KE) read from the base model and how they test an update.

- :func:`token_batch` turns (prompt, answer) pairs into right-padded sequences with the
  positions that predict the answer.
- :func:`capture` runs the frozen model on an edit, and returns the loss and, for each edited
  layer, the per-token factors of its gradient: the gradient of the loss with respect to the
  edited matrix W [d_out, d_in] of one token is the rank-one ``δ uᵀ``, with ``u`` the matrix's
  input and ``δ`` the gradient at its output.
- :func:`answer_logprobs` / :func:`all_logits` run the model with some parameters substituted
  (``torch.func.functional_call``), so an editor's update stays differentiable while the base
  weights are never written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from fedit.core.tokens import encode, pad, pad_id, target_ids


@dataclass
class TokenBatch:
    """Right-padded prompt + answer sequences and where the answer is predicted."""

    ids: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T]
    rows: torch.Tensor  # [K] row of each answer token
    cols: torch.Tensor  # [K] position whose logits predict that token
    labels: torch.Tensor  # [K] the answer token ids
    seq: torch.Tensor  # [K] index of the pair each answer token belongs to


def token_batch(tok, prompts: list[str], answers: list[str], device) -> TokenBatch:
    """Sequences ``prompt + answer`` (answer with its leading space) for teacher forcing."""
    seqs, rows, cols, labels = [], [], [], []
    for r, (p, a) in enumerate(zip(prompts, answers)):
        pi, ai = encode(tok, p), target_ids(tok, a)
        seqs.append(pi + ai)
        rows += [r] * len(ai)
        cols += list(range(len(pi) - 1, len(pi) - 1 + len(ai)))
        labels += ai
    ids, mask = pad(seqs, pad_id(tok))
    t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return TokenBatch(ids.to(device), mask.to(device), t(rows), t(cols), t(labels), t(rows))


def relative_names(lm, names: list[str]) -> dict[str, str]:
    """Full parameter name -> its name inside the adapter's body module (for functional_call)."""
    body = {id(p): n for n, p in lm.adapter.body().named_parameters()}
    full = dict(lm.model.named_parameters())
    return {n: body[id(full[n])] for n in names}


def _hidden(lm, batch: TokenBatch, params: dict[str, torch.Tensor] | None) -> torch.Tensor:
    body = lm.adapter.body()
    kw = {"input_ids": batch.ids, "attention_mask": batch.mask}
    if params:
        return functional_call(body, params, args=(), kwargs=kw, strict=False).last_hidden_state
    return body(**kw).last_hidden_state  # [B, T, d_model]


def answer_logprobs(lm, batch: TokenBatch, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Log-probability of every answer token [K] (``params``: body-relative names -> tensors)."""
    h = _hidden(lm, batch, params)[batch.rows, batch.cols]  # [K, d_model]
    logp = F.log_softmax(lm.adapter.logits(h).float(), -1)
    return logp.gather(1, batch.labels[:, None])[:, 0]


def mean_nll(lm, batch: TokenBatch, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean over pairs of the per-token NLL of each answer (a scalar)."""
    lp = answer_logprobs(lm, batch, params)
    n = int(batch.seq.max()) + 1
    per = torch.zeros(n, device=lp.device).index_add(0, batch.seq, -lp)
    cnt = torch.zeros(n, device=lp.device).index_add(0, batch.seq, torch.ones_like(lp))
    return (per / cnt).mean()


def all_logprobs(lm, batch: TokenBatch, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Log-probabilities at every real (unpadded) position [N, vocab]."""
    h = _hidden(lm, batch, params)[batch.mask.bool()]
    return F.log_softmax(lm.adapter.logits(h).float(), -1)


def kl_pre_post(pre_logp: torch.Tensor, post_logp: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(pre || post); both [N, vocab] log-probabilities."""
    return (pre_logp.exp() * (pre_logp - post_logp)).sum(-1).mean()


@dataclass
class Captured:
    """An edit's loss before the update and its gradient factors per edited layer."""

    loss: float
    u: dict[int, torch.Tensor]  # layer -> [N, d_in] inputs of W at the tokens that carry gradient
    delta: dict[int, torch.Tensor]  # layer -> [N, d_out] gradient at W's output, same tokens

    def gradient(self, layer: int) -> torch.Tensor:
        """The full gradient of the loss w.r.t. W of ``layer`` [d_out, d_in] (sum over tokens)."""
        return self.delta[layer].T @ self.u[layer]


def capture(lm, layers: list[int], batch: TokenBatch) -> Captured:
    """Run the frozen model on ``batch`` and factor the gradient of its mean answer NLL.

    Only tokens whose output gradient is non-zero are kept (positions after the last answer
    token, and padding, carry none). Nothing in the model changes and no parameter gradient
    is formed: the outputs of the edited matrices are the only tensors that require grad.
    """
    ad = lm.adapter
    ins: dict[int, torch.Tensor] = {}
    outs: dict[int, torch.Tensor] = {}

    def hook(layer):
        def f(_mod, args, out):
            ins[layer] = args[0].detach()
            if not out.requires_grad:  # the lowest edited layer: start the graph here
                out = out.detach().requires_grad_(True)
            outs[layer] = out
            return out
        return f

    handles = [ad.w_out(l).register_forward_hook(hook(l)) for l in sorted(layers)]
    try:
        with torch.enable_grad():
            loss = mean_nll(lm, batch)
            grads = torch.autograd.grad(loss, [outs[l] for l in sorted(layers)])
    finally:
        for h in handles:
            h.remove()
    keep = batch.mask.bool()
    u, d = {}, {}
    for l, g in zip(sorted(layers), grads):
        gl, ul = g[keep].float(), ins[l][keep].float()  # [N, d_out], [N, d_in]
        nz = (gl != 0).any(-1) & (ul != 0).any(-1)
        u[l], d[l] = ul[nz], gl[nz]
    return Captured(loss=float(loss.detach()), u=u, delta=d)


def substituted(lm, layers: list[int], updates: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Body-relative parameters W + ΔW for ``updates`` (layer -> ΔW [d_out, d_in], may carry grad)."""
    ad = lm.adapter
    names = {l: ad.w_out_param_name(l) for l in layers}
    rel = relative_names(lm, list(names.values()))
    params = dict(lm.model.named_parameters())
    out = {}
    for l, dw in updates.items():
        p = params[names[l]]
        out[rel[names[l]]] = p + ad.to_param_layout(dw).to(p.dtype)
    return out
