"""Layer-sequential CollabEdit (``form="layerwise"``): one exchange of statistics per edited layer.

MEMIT as published edits its layers lowest first, each measured on the model as edited by the
layers below. The federated version keeps that order: for layer l (step i of the edited layers)
the server has published the merged updates of this round's layers below l; each client
measures, on that model, its keys K at l and the residual z − h_L left at the last layer,
takes the share 1/(layers left), carries it into W_out's output space at l, and sends

    R Kᵀ  [d_out, d_in]   and   K Kᵀ  [d_in, d_in]

for layer l only. The server sums them (through SecAgg+ where the base form's sums go through
it) and solves Δ_l = Σ R Kᵀ (λC₀ + C₁ + Σ K Kᵀ)⁻¹. Targets z are optimised once per client and
round, as in the base form. With the same z, second moments and hyperparameters this is
centralised layer-by-layer MEMIT over the union of the clients' facts (MEMIT's optional
backtracking, which halves a layer's step by looking at every fact's residual, has no federated
counterpart and must be off).
"""

from __future__ import annotations

import torch

from fedit.core import activations
from fedit.core.pullback import pull_back
from fedit.methods.vectors import LayerSums


def layer_stats(lm, requests: list, zs: torch.Tensor, layers: list[int], step: int, groups: list[list[str]],
                pullback_steps: int = 0) -> LayerSums:
    """The statistics of ``requests`` with targets ``zs`` [n, d_model] at ``layers[step]``, measured
    on ``lm`` as it is (carrying the merged updates of the layers below)."""
    ad, l, L = lm.adapter, layers[step], layers[-1]
    K = activations.keys(lm, [l], requests, groups)[l].double()  # [n, d_in]
    cur = activations.at_subject(lm, requests, ["{}"], {"h": f"{ad.block_name(L)}:output",
                                                        "o": f"{ad.w_out_name(l)}:output"})
    want = (zs.to(lm.device).float() - cur["h"][:, 0].float()) / (len(layers) - step)  # [n, d_model]
    if pullback_steps > 0 and l != L:
        want, _, _ = pull_back(lm, requests, l, L, want, steps=pullback_steps)
    R = ad.residual_to_w_out(l, want, cur["o"][:, 0]).double().cpu()  # [n, d_out]
    K = K.cpu()
    return LayerSums(RK=R.T @ K, KK=K.T @ K, n=len(requests))
