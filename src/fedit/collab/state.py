"""The server's state across rounds: the published model change, C₁, and the facts applied.

Multi-round CollabEdit ("forgetting"): after round t the server adds the applied
facts' key covariance to a running C₁ and solves round t+1 with λC₀ + C₁. With

    C₁ = Σ_{s ≤ t} K_s K_sᵀ        (``c1_weight`` = 1, the default)

round t+1's solve is recursive least squares: for one linear layer whose keys do not move,
Δ₁ + … + Δ_{t+1} equals the single global solve R Kᵀ(λC₀ + K Kᵀ)⁻¹ over all rounds' facts
(R measured on the base model), because each round's residual R_{t+1} = V − (W₀ + ΣΔ)K is
measured on the model that carries the earlier rounds. The CollabEdit paper writes ``C₁ += λ K Kᵀ``; that
weighs earlier edits λ times more than a new one (λ = 10⁴ typically), pinning them harder than
the global solve does. ``c1_weight`` = λ gives that variant; we default to 1 because only it
reproduces the global edit. In a real model the identity is approximate: a later round's keys
at layer l are measured on a model whose lower layers were already edited.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedit.methods.vectors import LayerSums


@dataclass
class CollabState:
    delta: dict[int, torch.Tensor] = field(default_factory=dict)  # Σ of applied merged Δ [d_out, d_in]
    C1: dict[int, torch.Tensor] = field(default_factory=dict)  # running covariance of applied keys
    applied: dict[str, tuple[str, int]] = field(default_factory=dict)  # key digest -> (target digest, round)
    round: int = 0
    version: str = "base"  # names the model state clients must measure on

    def apply(self, delta: dict[int, torch.Tensor], stats: dict[int, LayerSums] | None, facts: dict[str, str],
              c1: bool = True, c1_weight: float = 1.0, version: str | None = None) -> None:
        """Record one merged round: add Δ, grow C₁ by ``c1_weight`` · ΣKKᵀ, remember the facts."""
        self.round += 1
        for l, d in delta.items():
            self.delta[l] = self.delta.get(l, 0) + d.double()
        if c1 and stats:
            for l, st in stats.items():
                self.C1[l] = self.C1.get(l, 0) + c1_weight * st.KK.double()
        for key, target in facts.items():
            self.applied.setdefault(key, (target, self.round))
        self.version = version or f"round-{self.round}"


def add_layers(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Per-layer sum of two updates (a layer missing from one counts as zero)."""
    return {l: a.get(l, 0) + b.get(l, 0) for l in sorted(set(a) | set(b))}
