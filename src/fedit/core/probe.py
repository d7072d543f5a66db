"""What the model says: probability of a continuation and the top next token."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedit.core.tokens import encode, pad, pad_id, target_ids


@torch.no_grad()
def continuation_logprob(lm, prompts: list[str], targets: list[str]) -> list[tuple[float, int]]:
    """For each (prompt, target): (sum of target-token log-probabilities, number of target tokens).

    Teacher forcing; logits are formed only at the positions that predict target tokens.
    """
    tok, ad = lm.tokenizer, lm.adapter
    seqs, spans = [], []
    for p, t in zip(prompts, targets):
        pi, ti = encode(tok, p), target_ids(tok, t)
        seqs.append(pi + ti)
        spans.append((len(pi), ti))
    ids, mask = pad(seqs, pad_id(tok))
    hidden = ad.body()(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device)).last_hidden_state
    out = []
    for r, (P, ti) in enumerate(spans):
        pos = torch.arange(P - 1, P - 1 + len(ti), device=lm.device)
        logp = F.log_softmax(ad.logits(hidden[r, pos]).float(), -1)
        out.append((float(logp[torch.arange(len(ti)), torch.tensor(ti, device=lm.device)].sum()), len(ti)))
    return out


@torch.no_grad()
def next_token(lm, prompts: list[str], k: int = 1) -> list[list[tuple[str, float]]]:
    """Top-k next tokens (decoded text, probability) after each prompt."""
    tok, ad = lm.tokenizer, lm.adapter
    seqs = [encode(tok, p) for p in prompts]
    ids, mask = pad(seqs, pad_id(tok))
    hidden = ad.body()(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device)).last_hidden_state
    last = hidden[torch.arange(len(seqs), device=lm.device), mask.sum(1).to(lm.device) - 1]
    probs = F.softmax(ad.logits(last).float(), -1)
    top = probs.topk(k, dim=-1)
    return [[(tok.decode([int(i)]), float(v)) for v, i in zip(vals, idx)] for vals, idx in zip(top.values, top.indices)]


def describe(lm, prompt: str, target: str) -> dict:
    """{"target_prob", "top_token", "top_prob"} for one prompt and target (joint target probability)."""
    (lp, _), = continuation_logprob(lm, [prompt], [target])
    top_tok, top_p = next_token(lm, [prompt])[0][0]
    return {"target_prob": float(torch.tensor(lp).exp()), "top_token": top_tok, "top_prob": top_p}
