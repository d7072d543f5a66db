"""Target-token losses computed from one layer up: the blocks below it run once, without grad.

Fine-tuning one MLP weight, optimising GRACE values and training WISE's side weight all
change layer ``L`` and nothing below it, so the inputs of block ``L`` are fixed: :class:`Tail`
records them (and the arguments every block was called with) in one pass, then re-runs only
blocks ``L..`` for each optimisation step. The input and output of ``W_out`` at ``L`` are kept
too (GRACE's keys and warm values, WISE's activations).

With ``vocab_subset`` > 0, :meth:`Tail.nll` forms the full vocabulary's logits only on every
``vocab_refresh``-th call and in between the logits of a candidate vocabulary
(:func:`fedit.core.lse.candidate_vocab`: the top ``vocab_subset`` tokens at each scored position
and the target tokens), the rest of the normaliser frozen at the last exact call. Gemma 3's
262k-token unembedding is read once per exact call instead of on every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedit.core import lse
from fedit.core.hooks import call_block, capture, record_block_calls
from fedit.core.tokens import encode, pad, pad_id, target_ids


@dataclass
class TargetRows:
    """Token rows of some (prompt, target) pairs and the logit positions that score the targets."""

    ids: torch.Tensor  # [B, T] right-padded
    mask: torch.Tensor  # [B, T]
    rows: torch.Tensor  # [N] row of each scored target token
    cols: torch.Tensor  # [N] position whose logits predict it
    toks: torch.Tensor  # [N] the target token
    pair: torch.Tensor  # [N] index of its (prompt, target) pair
    weight: torch.Tensor  # [N] 1 / (tokens of its target): sums to the mean NLL per pair
    n: int  # number of pairs

    def to(self, device) -> "TargetRows":
        return TargetRows(*(getattr(self, f).to(device) for f in
                            ("ids", "mask", "rows", "cols", "toks", "pair", "weight")), n=self.n)


def target_rows(tok, prompts: list[str], targets: list[str], objective: str = "target_new") -> TargetRows:
    """Rows for the NLL of each target after its prompt.

    ``objective="target_new"``: teacher forcing, the row is prompt + target[:-1] and target token
    j is read at position P-1+j. ``"prompt_last"`` (ROME's FT-L): the row is the prompt alone and
    every target token is read at its last position.
    """
    seqs, rows, cols, toks, pair, weight = [], [], [], [], [], []
    for i, (p, t) in enumerate(zip(prompts, targets)):
        pi, ti = encode(tok, p), target_ids(tok, t)
        P, m = len(pi), len(ti)
        if objective == "prompt_last":
            seqs.append(pi)
            cols += [P - 1] * m
        else:
            seqs.append(pi + ti[:-1])
            cols += list(range(P - 1, P - 1 + m))
        rows += [i] * m
        toks += ti
        pair += [i] * m
        weight += [1.0 / m] * m
    ids, mask = pad(seqs, pad_id(tok))
    return TargetRows(ids, mask, torch.tensor(rows), torch.tensor(cols), torch.tensor(toks), torch.tensor(pair),
                      torch.tensor(weight), n=len(seqs))


class Tail:
    """Blocks ``layer..`` of ``lm`` over fixed rows; whatever hooks or parameters at those blocks
    are live when :meth:`final` runs take part (and receive gradients)."""

    def __init__(self, lm, rows: TargetRows, layer: int, vocab_subset: int = 0, vocab_refresh: int = 5):
        if vocab_subset < 0 or vocab_refresh < 1:
            raise ValueError(f"vocab_subset must be >= 0 and vocab_refresh >= 1, got {vocab_subset}, {vocab_refresh}")
        self.lm, self.layer = lm, layer
        self.vocab_subset, self.vocab_refresh = vocab_subset, vocab_refresh
        self.calls_made = 0  # of nll(); every vocab_refresh-th one is exact
        self._sub: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.r = rows.to(lm.device)
        ad = lm.adapter
        self.blocks = list(ad.blocks())
        with torch.no_grad(), record_block_calls(self.blocks) as calls, \
                capture({"block": self.blocks[layer]}, inputs=True, outputs=False) as blk, \
                capture({"w": ad.w_out(layer)}, inputs=True) as w:
            ad.body()(input_ids=self.r.ids, attention_mask=self.r.mask)
        self.calls = calls
        self.start = blk["block"]["input"]  # [B, T, d] input of block `layer`
        self.w_in = w["w"]["input"]  # [B, T, d_in] input of W_out at `layer` (MLP activations)
        self.w_out = w["w"]["output"]  # [B, T, d_out] its output

    def final(self) -> torch.Tensor:
        """Hidden states after the final norm, [B, T, d], from the recorded input of block ``layer``."""
        x = self.start
        for j in range(self.layer, len(self.blocks)):
            x = call_block(self.blocks[j], self.calls[j], x)
        return self.lm.adapter.final_norm()(x)

    def nll(self, final: torch.Tensor | None = None) -> torch.Tensor:
        """Mean NLL of each pair's target tokens, [n] (differentiable)."""
        final = self.final() if final is None else final
        r, ad = self.r, self.lm.adapter
        h = final[r.rows, r.cols]
        exact = not self.vocab_subset or self._sub is None or self.calls_made % self.vocab_refresh == 0
        self.calls_made += 1
        if exact:
            logits = ad.logits(h).float()  # [N, V]
            if self.vocab_subset:
                vocab, tail = lse.candidate_vocab(logits.detach(), self.vocab_subset, r.toks)
                self._sub = (vocab, ad.unembed().weight[vocab], tail, torch.searchsorted(vocab, r.toks))
            logp = F.log_softmax(logits, -1).gather(1, r.toks[:, None])[:, 0]
        else:  # the candidates only, the rest of the normaliser as at the last exact call
            vocab, weight, tail, tok_at = self._sub
            part = lse.candidate_log_softmax(ad.logits(h, weight=weight, vocab=vocab), tail)
            logp = part.gather(1, tok_at[:, None])[:, 0]
        tok_nll = -logp * r.weight
        return torch.zeros(r.n, device=tok_nll.device).index_add(0, r.pair, tok_nll)
