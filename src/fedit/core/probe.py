"""What the model says: probability of a continuation and the top next token."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedit.core.tokens import encode, pad, pad_id, target_ids


def encode_pairs(tok, prompts: list[str], answers: list[str]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) of each pair; the answer as it continues the prompt."""
    return [(encode(tok, p), target_ids(tok, a)) for p, a in zip(prompts, answers)]


def probe_inputs(encoded: list[tuple[list[int], list[int]]]) -> list[tuple[int, ...]]:
    """The token sequence each encoded pair (:func:`encode_pairs`) is run on under teacher
    forcing: the prompt and every answer token but the last (the logits at its positions
    predict the answer)."""
    return [tuple(p + a[:-1]) for p, a in encoded]


def shared_inputs(inputs: list[tuple[int, ...]]) -> tuple[list[tuple[int, ...]], list[int]]:
    """The token sequences to run, and for each input the index of the one that holds it.

    In a causal LM the hidden states of a sequence are the same when it is the prefix of a
    longer one, so an input that equals, or begins, another input is read from that one. In
    lexicographic order a sequence's extensions follow it directly, so one backward pass over
    the sorted inputs finds each input's longest extension (its host).
    """
    uniq = sorted(set(inputs))
    host: dict[tuple[int, ...], tuple[int, ...]] = {}
    for k in range(len(uniq) - 1, -1, -1):
        seq = uniq[k]
        nxt = uniq[k + 1] if k + 1 < len(uniq) else None
        host[seq] = host[nxt] if nxt is not None and nxt[:len(seq)] == seq else seq
    runs = sorted(set(host.values()), key=lambda r: (len(r), r))
    index = {r: j for j, r in enumerate(runs)}
    return runs, [index[host[seq]] for seq in inputs]


@torch.no_grad()
def teacher_forced(lm, prompts: list[str], answers: list[str], batch_size: int = 32,
                   share: bool = True) -> list[dict]:
    """Score each answer after its prompt under teacher forcing.

    Returns per pair ``{"nll_sum", "n_tokens", "pred", "answer"}`` (``pred``: the top-1
    token id at each answer position; ``answer``: the answer's token ids). Logits are formed
    only at answer positions, once per position however many pairs read it. A pair's input is
    its prompt and all answer tokens but the last; with ``share`` (the default) pairs whose
    inputs are equal or prefixes of one another (the true and the new target after the same
    prompt, single-token answers above all) are read from one forward pass
    (:func:`shared_inputs`). Sequences are batched by length (less padding); results come
    back in the order given.
    """
    tok, ad = lm.tokenizer, lm.adapter
    encoded = encode_pairs(tok, prompts, answers)
    inputs = probe_inputs(encoded)
    if share:
        runs, where = shared_inputs(inputs)
    else:
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        runs, where = [inputs[i] for i in order], [0] * len(inputs)
        for j, i in enumerate(order):
            where[i] = j
    readers: list[list[int]] = [[] for _ in runs]
    for i, j in enumerate(where):
        readers[j].append(i)
    out: list[dict | None] = [None] * len(encoded)
    for s in range(0, len(runs), batch_size):
        batch = list(range(s, min(s + batch_size, len(runs))))
        ids, mask = pad([list(runs[j]) for j in batch], pad_id(tok))
        hidden = ad.body()(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device)).last_hidden_state
        pairs = [(r, i) for r, j in enumerate(batch) for i in readers[j]]
        spans = [(len(encoded[i][0]), encoded[i][1]) for _, i in pairs]
        rows = torch.cat([torch.full((len(ai),), r) for (r, _), (_, ai) in zip(pairs, spans)])
        cols = torch.cat([torch.arange(P - 1, P - 1 + len(ai)) for P, ai in spans])
        # positions read by several pairs (two targets after one prompt): one row of logits each
        cells, slot = torch.unique(torch.stack([rows, cols], 1), dim=0, return_inverse=True)
        cells, slot = cells.to(lm.device), slot.to(lm.device)
        logp = F.log_softmax(ad.logits(hidden[cells[:, 0], cells[:, 1]]).float(), -1)
        flat_ans = torch.tensor([t for _, ai in spans for t in ai], device=lm.device)
        nll = -logp[slot, flat_ans]
        pred = logp.argmax(-1)[slot]
        k = 0
        for (_, i), (_, ai) in zip(pairs, spans):
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
