"""PMET: attention and MLP targets optimised together, only the MLP written (docs/methods.md).

PMET (Li et al., AAAI 2024) holds that the hidden state at layer L mixes what attention and
the MLP contribute, and that only the MLP's part should go into W_out. It optimises two
vectors per request at the last edited layer L, one added to the attention output and one to
the MLP output (W_out's output), jointly (30 steps, lr 0.2, KL factor 1, weight decay
‖δ‖/‖h‖ per vector), keeps the MLP one, and spreads its residual over the edited layers with
weight 1/√(layers left) instead of MEMIT's 1/(layers left). The layer loop, keys, statistics
and closed form are MEMIT's (``memit.spread_over_layers``).

The residual is measured as PMET's code does, at W_out's output of layer L: z_mlp − o_L on the
model as edited so far. Where a norm sits between the MLP and the residual stream (Gemma 2/3)
it is measured after that norm, norm(z_mlp) − norm(o_L), so that it is a change of block L's
output like MEMIT's and can be carried back to lower layers the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from fedit.core.solve import memit_delta
from fedit.core.targets import TargetConfig
from fedit.core.tokens import validate_for_tokenizer
from fedit.methods.base import EditOutcome, Resources
from fedit.methods.memit import (
    MemitHparams,
    Residual,
    spread_over_layers,
    to_weight_deltas,
    with_vectors,
)
from fedit.methods.targets import targets_for
from fedit.requests import EditRequest


@dataclass
class PmetHparams(MemitHparams):
    """MEMIT's options with PMET's defaults (GPT-J values of the PMET paper)."""

    v_num_grad_steps: int = 30
    v_lr: float = 0.2
    kl_factor: float = 1.0
    mom2_update_weight: float = 6000.0

    def target_config(self) -> TargetConfig:
        return replace(super().target_config(), site="w_out", joint_site="attn", decay_power=1)


def mlp_residual(lm, z_mlp: torch.Tensor, layer: int) -> Residual:
    """PMET's residual: the MLP target minus W_out's output at ``layer`` now, in residual space."""
    ad = lm.adapter
    z_mlp = z_mlp.to(lm.device).float()
    norm = ad.mlp_out_norm(layer)

    @torch.no_grad()
    def fn(a):
        o = a["o"][:, 0]
        if norm is None:
            return z_mlp - o.float()
        return norm(z_mlp.to(o.dtype)).float() - norm(o).float()

    return Residual({"o": f"{ad.w_out_name(layer)}:output"}, fn)


def compute_pmet(lm, requests: list[EditRequest], hp: PmetHparams, res: Resources,
                 zs: torch.Tensor | None = None) -> EditOutcome:
    """PMET deltas (W_out of ``hp.layers`` only) for a batch of requests; the model is unchanged.

    ``zs`` [n, d_model] may supply precomputed MLP targets (W_out output space at layer L).
    ``diagnostics["residual_norms"]`` holds the mean residual at L before the first layer and
    after each one.
    """
    t0 = time.perf_counter()
    validate_for_tokenizer(lm.tokenizer, requests, lm.model)
    layers, L = hp.layers, hp.layers[-1]
    groups = res.templates(lm, hp.context_template_length_params)
    targets, t_target = [], 0.0
    if zs is None:  # z at W_out's output of L, optimised jointly with the attention target (target_config)
        zs, targets, t_target = targets_for(lm, requests, hp, groups, res.target_store())
    C = res.second_moments(lm, layers, hp.mom2_samples, hp.mom2_seq_len)
    deltas, diag = spread_over_layers(lm, requests, hp, groups, mlp_residual(lm, zs, L),
                                      lambda l, K, R: memit_delta(K, R, C[l], hp.mom2_update_weight),
                                      share_power=0.5)
    with_vectors(lm, zs, diag)
    return EditOutcome(deltas=to_weight_deltas(lm, deltas, "pmet", requests, hp), targets=targets,
                       seconds=time.perf_counter() - t0, target_seconds=t_target, diagnostics=diag)
