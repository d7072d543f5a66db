"""The sums a MEMIT solve needs from a set of facts at one layer: R Kᵀ and K Kᵀ.

They add over any partition of the facts, so a client can ship them instead of its requests
(CollabEdit) and a server can sum them (``+``) before the one solve
(:func:`fedit.core.solve.delta_from_sums`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerSums:
    """Σ r kᵀ and Σ k kᵀ of ``n`` facts at one layer, in float64."""

    RK: torch.Tensor  # Σ r kᵀ  [d_out, d_in]
    KK: torch.Tensor  # Σ k kᵀ  [d_in, d_in]
    n: int

    @classmethod
    def of(cls, K: torch.Tensor, R: torch.Tensor) -> "LayerSums":
        """The sums of keys ``K`` [n, d_in] and W_out-space residuals ``R`` [n, d_out]."""
        K64, R64 = K.double(), R.double()
        return cls(RK=R64.T @ K64, KK=K64.T @ K64, n=int(K.shape[0]))

    def __add__(self, other: "LayerSums") -> "LayerSums":
        return LayerSums(self.RK + other.RK, self.KK + other.KK, self.n + other.n)
