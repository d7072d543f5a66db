"""What the page shows about a fact: target probabilities and greedy generations per prompt."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedit.core.probe import continuation_logprob
from fedit.core.tokens import encode, pad_id
from fedit.requests import EditRequest


@dataclass(frozen=True)
class ProbeSet:
    """The prompts measured around one edit: the edited prompt, its paraphrases, its neighbours
    (prompts about other subjects whose answers must not change). All with the subject filled in."""

    request: EditRequest
    paraphrases: tuple[str, ...] = ()
    neighbours: tuple[str, ...] = ()

    def rows(self) -> list[tuple[str, str]]:
        """(group, prompt) for every prompt, the edited prompt first."""
        return ([("prompt", self.request.filled_prompt)] + [("paraphrase", p) for p in self.paraphrases]
                + [("neighbour", p) for p in self.neighbours])


# Control markers that a converted tokenizer may not flag as special (Gemma 3's from GGUF): the
# base model emits <start_of_image> where its text ends.
CONTROL_TOKENS = ("<start_of_image>", "<end_of_image>", "<start_of_turn>", "<end_of_turn>")


def stop_ids(tok) -> set[int]:
    """Ids where a shown continuation ends: special tokens (also added ones the tokenizer does
    not list among its special ids) and :data:`CONTROL_TOKENS`."""
    added = getattr(tok, "added_tokens_decoder", None) or {}
    vocab = tok.get_vocab()
    return (set(tok.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}
            | {vocab[t] for t in CONTROL_TOKENS if t in vocab})


@torch.no_grad()
def greedy(lm, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuation of each prompt: up to ``max_new_tokens`` tokens, cut where the model
    emits a stop token (:func:`stop_ids`)."""
    tok, texts = lm.tokenizer, []
    stops = stop_ids(tok)
    for p in prompts:
        ids = torch.tensor([encode(tok, p)], device=lm.device)  # [1, T]
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=max_new_tokens, pad_token_id=pad_id(tok))
        new = out[0, ids.shape[1]:].tolist()
        cut = next((k for k, i in enumerate(new) if i in stops), len(new))
        texts.append(tok.decode(new[:cut]))
    return texts


def measure(lm, probes: ProbeSet, gen_tokens: int = 12) -> list[dict]:
    """Per prompt: ``{"group", "prompt", "p_new", "p_true", "generation"}``.

    ``p_new``/``p_true``: joint probability of the whole new/true target after the prompt
    (teacher-forced); ``p_true`` is None when the request has no true target."""
    rows = probes.rows()
    prompts = [p for _, p in rows]
    req = probes.request
    targets = [req.target_new] * len(prompts) + ([req.target_true] * len(prompts) if req.target_true else [])
    scored = continuation_logprob(lm, prompts * (2 if req.target_true else 1), targets)
    p = [math.exp(lp) for lp, _ in scored]
    gens = greedy(lm, prompts, gen_tokens)
    n = len(prompts)
    return [{"group": g, "prompt": text, "p_new": p[i], "p_true": p[n + i] if req.target_true else None,
             "generation": gens[i]} for i, (g, text) in enumerate(rows)]
