"""Similarity search over mediator knowledge vectors (MKVs): pure functions on tensors.

The FedEdit retrieval rule (FLEKE): a client holding ``n`` own MKVs
v_1..v_n of a time slot takes another client's MKV v_o of that slot as a *hit* when

    #{ j : cos(v_j, v_o) > tau } >= n / 2          (tau = 0.4; strict ``>``)

evaluated in integers as ``2 * count >= n``. With ``n = 0`` nothing is a hit.
"""

from __future__ import annotations

import torch

from fedit.errors import FeditError

DEFAULT_TAU = 0.4


def _as_float(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise FeditError(f"{name} must be a torch.Tensor, got {type(x).__name__}.",
                         f"pass {name} as a tensor, e.g. torch.stack(vectors).")
    if x.dtype == torch.float64:
        return x
    return x.to(torch.float32)


def _check_2d(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2:
        raise FeditError(f"{name} must be 2-D [rows, dim], got shape {tuple(x.shape)}.",
                         f"stack the vectors into one [rows, dim] tensor (use {name}[None] for one vector).")


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length; all-zero rows stay zero (so their similarities are 0)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # [rows, 1]
    return torch.where(norm > 0, x / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(x))


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarities of every row of ``a`` [m, d] with every row of ``b`` [n, d] -> [m, n].

    Computed in float64 when either input is float64, else in float32 (half and integer inputs
    are upcast). A zero row has similarity 0 with everything (never NaN). Values are clamped
    to [-1, 1]. Inputs are not modified.
    """
    a, b = _as_float(a, "a"), _as_float(b, "b")
    _check_2d(a, "a")
    _check_2d(b, "b")
    if a.shape[1] != b.shape[1]:
        raise FeditError(f"vectors of different dimensions: a is [*, {a.shape[1]}], b is [*, {b.shape[1]}].",
                         "compare MKVs of the same model and layer (same hidden size).")
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.to(dtype), b.to(dtype)
    return (_unit_rows(a) @ _unit_rows(b).T).clamp_(-1.0, 1.0)  # [m, n]


def fededit_hits(own: torch.Tensor, others: torch.Tensor,
                 tau: float = DEFAULT_TAU) -> tuple[torch.Tensor, torch.Tensor]:
    """FedEdit's hit rule: which of ``others`` [m, d] a client with MKVs ``own`` [n, d] re-uses.

    Returns ``(hit, counts)``: ``counts[o]`` (LongTensor [m]) is how many own vectors have
    cosine similarity strictly above ``tau`` with ``others[o]``; ``hit[o]`` (BoolTensor [m]) is
    ``2 * counts[o] >= n`` and ``n > 0``.
    """
    own, others = _as_float(own, "own"), _as_float(others, "others")
    _check_2d(own, "own")
    _check_2d(others, "others")
    n = own.shape[0]
    sims = cosine_matrix(own, others)  # [n, m]
    counts = (sims > tau).sum(dim=0, dtype=torch.long)  # [m]
    hit = (2 * counts >= n) if n > 0 else torch.zeros_like(counts, dtype=torch.bool)
    return hit, counts


def topk(query: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` keys [m, d] most cosine-similar to ``query`` ([d] or [q, d]), best first.

    Returns ``(scores, indices)`` of shape [k'] for a 1-D query and [q, k'] for a 2-D one, with
    k' = min(k, m). Ties keep no particular order.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise FeditError(f"k must be a non-negative whole number, got {k!r}.", "pass e.g. k=5.")
    q = _as_float(query, "query")
    one = q.dim() == 1
    sims = cosine_matrix(q[None] if one else q, keys)  # [q, m]
    scores, idx = sims.topk(min(k, sims.shape[1]), dim=1, largest=True, sorted=True)
    return (scores[0], idx[0]) if one else (scores, idx)
