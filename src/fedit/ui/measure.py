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


def special_ids(tok) -> set[int]:
    """Ids of special tokens, including added ones the tokenizer does not list as special
    (Gemma 3's ``<start_of_image>`` and its other multimodal markers)."""
    added = getattr(tok, "added_tokens_decoder", None) or {}
    return set(tok.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}


@torch.no_grad()
def greedy(lm, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuation of each prompt (``max_new_tokens`` tokens, special tokens dropped)."""
    tok, texts = lm.tokenizer, []
    special = special_ids(tok)
    for p in prompts:
        ids = torch.tensor([encode(tok, p)], device=lm.device)  # [1, T]
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=max_new_tokens, pad_token_id=pad_id(tok))
        texts.append(tok.decode([i for i in out[0, ids.shape[1]:].tolist() if i not in special]))
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
