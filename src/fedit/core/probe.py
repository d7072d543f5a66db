"""What the model says: probability of a continuation and the top next token."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedit.core.tokens import encode, pad, pad_id, target_ids


@torch.no_grad()
def teacher_forced(lm, prompts: list[str], answers: list[str], batch_size: int = 32) -> list[dict]:
    """Score each answer after its prompt under teacher forcing.

    Returns per pair ``{"nll_sum", "n_tokens", "pred", "answer"}`` (``pred``: the top-1
    token id at each answer position; ``answer``: the answer's token ids). Logits are formed
    only at answer positions. Pairs are batched by length (less padding), results come back
    in the order given.
    """
    tok, ad = lm.tokenizer, lm.adapter
    encoded = [(encode(tok, p), target_ids(tok, a)) for p, a in zip(prompts, answers)]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
    out: list[dict | None] = [None] * len(encoded)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        seqs = [encoded[i][0] + encoded[i][1] for i in idx]
        spans = [(len(encoded[i][0]), encoded[i][1]) for i in idx]
        ids, mask = pad(seqs, pad_id(tok))
        hidden = ad.body()(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device)).last_hidden_state
        rows = torch.cat([torch.full((len(ai),), r) for r, (_, ai) in enumerate(spans)]).to(lm.device)
        cols = torch.cat([torch.arange(P - 1, P - 1 + len(ai)) for P, ai in spans]).to(lm.device)
        logp = F.log_softmax(ad.logits(hidden[rows, cols]).float(), -1)
        flat_ans = torch.tensor([t for _, ai in spans for t in ai], device=lm.device)
        nll = -logp.gather(1, flat_ans[:, None])[:, 0]
        pred = logp.argmax(-1)
        k = 0
        for i, (_, ai) in zip(idx, spans):
            m = len(ai)
            out[i] = {"nll_sum": float(nll[k:k + m].sum()), "n_tokens": m, "pred": pred[k:k + m].tolist(),
                      "answer": list(ai)}
            k += m
    return out


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
