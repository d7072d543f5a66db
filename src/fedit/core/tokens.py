"""Tokenisation helpers: subject positions, targets, padding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedit.errors import RequestError
from fedit.requests import EditRequest


def encode(tok, text: str, special: bool = True) -> list[int]:
    return list(tok(text, add_special_tokens=special)["input_ids"])


def target_ids(tok, target: str) -> list[int]:
    """Token ids of a continuation (leading space added where missing), no special tokens."""
    return encode(tok, EditRequest.target_text(target), special=False)


def pad_id(tok) -> int:
    for cand in (tok.pad_token_id, tok.eos_token_id, 0):
        if cand is not None:
            return int(cand)
    return 0


def last_token_of_span(tok, text: str, end: int) -> tuple[list[int], int]:
    """Encode ``text`` (with special tokens) and find the token holding character ``end - 1``.

    Uses the fast tokenizer's offsets; falls back to ROME's method (length of the encoded
    prefix) for slow tokenizers.
    """
    if getattr(tok, "is_fast", False):
        enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        best = None
        for i, (s, e) in enumerate(offsets):
            if s == e:
                continue  # special token
            if s <= end - 1 < e:
                return ids, i
            if e <= end:
                best = i
        if best is None:
            raise RequestError(f"no token covers the subject in {text!r}.", "check the subject spelling.")
        return ids, best
    ids = encode(tok, text)
    return ids, len(encode(tok, text[:end])) - 1


@dataclass
class PromptBatch:
    """Right-padded prompts with, per row, the index of one looked-up token."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    lookup: torch.Tensor  # [B] subject-last-token index per row
    lengths: torch.Tensor  # [B]

    def to(self, device) -> "PromptBatch":
        return PromptBatch(self.input_ids.to(device), self.attention_mask.to(device), self.lookup.to(device),
                           self.lengths.to(device))


def pad(seqs: list[list[int]], pid: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pid, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def fill_template(template: str, prompt: str, subject: str) -> tuple[str, int]:
    """Put ``prompt`` into a context template and the subject into the prompt.

    Returns the text and the character index just past the subject.
    """
    pre = template.split("{}")[0]
    full = pre + prompt
    start = full.index("{}")
    return full.replace("{}", subject, 1), start + len(subject)


def subject_batch(tok, templates: list[str], requests: list[EditRequest],
                  suffix_ids: list[list[int]] | None = None) -> PromptBatch:
    """One row per (request, template) in request-major order; lookup at the subject's last token.

    ``suffix_ids`` (one list per request) are appended after each prompt, e.g. target tokens.
    """
    seqs, lookup = [], []
    for r_i, req in enumerate(requests):
        for tpl in templates:
            text, end = fill_template(tpl, req.prompt, req.subject)
            ids, idx = last_token_of_span(tok, text, end)
            if suffix_ids is not None:
                ids = ids + suffix_ids[r_i]
            seqs.append(ids)
            lookup.append(idx)
    ids, mask = pad(seqs, pad_id(tok))
    return PromptBatch(ids, mask, torch.tensor(lookup), mask.sum(1))


# Tokens kept free for the context prefixes the methods put before a prompt.
CONTEXT_RESERVE = 24


def context_length(model) -> int | None:
    """The longest input ``model`` takes (``max_position_embeddings``/``n_positions``), or None."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def validate_for_tokenizer(tok, requests: list[EditRequest], model=None) -> None:
    """Reject requests the tokenizer cannot place, or (``model`` given) longer than the model's
    context less :data:`CONTEXT_RESERVE`: raise before any weight changes."""
    special = set(getattr(tok, "all_special_ids", []) or [])
    limit = context_length(model) if model is not None else None
    for req in requests:
        where = f"request {req.case_id!r}" if req.case_id is not None else f"request for {req.subject!r}"
        for name, ids in (("subject", encode(tok, req.subject, special=False)),
                          ("target_new", target_ids(tok, req.target_new))):
            if not [i for i in ids if i not in special]:
                raise RequestError(f"{where}: {name} {getattr(req, name)!r} tokenises to no ordinary token "
                                   f"(got {ids}).", f"give a {name} made of ordinary text, not special tokens.")
        text, end = fill_template("{}", req.prompt, req.subject)
        ids, idx = last_token_of_span(tok, text, end)
        if not 0 <= idx < len(ids):
            raise RequestError(f"{where}: cannot find the subject's last token in {text!r}.",
                               "check that the subject is spelled as it appears in the prompt.")
        n = len(ids) + len(target_ids(tok, req.target_new))
        if limit is not None and n > limit - CONTEXT_RESERVE:
            raise RequestError(f"{where}: prompt and target are {n} tokens; the model takes at most {limit} "
                               f"({CONTEXT_RESERVE} of them kept for context prefixes).",
                               f"shorten the prompt or target to at most {limit - CONTEXT_RESERVE} tokens.")


def span_tokens(tok, text: str, start: int, end: int) -> tuple[list[int], int, int]:
    """Encode ``text`` (with special tokens) and find the tokens covering characters [start, end).

    Returns (ids, lo, hi): tokens ``lo .. hi-1`` hold the span. Uses the fast tokenizer's
    offsets; for slow tokenizers, the lengths of the encoded prefixes.
    """
    if getattr(tok, "is_fast", False):
        enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        inside = [i for i, (s, e) in enumerate(offsets) if s != e and s < end and e > start]
        if not inside:
            raise RequestError(f"no token covers characters {start}..{end} of {text!r}.", "check the subject spelling.")
        return ids, inside[0], inside[-1] + 1
    ids = encode(tok, text)
    lo = len(encode(tok, text[:start])) if start > 0 else len(encode(tok, ""))
    hi = len(encode(tok, text[:end]))
    return ids, min(lo, hi - 1), hi
