"""AlphaEdit: MEMIT's update projected onto the null space of preserved knowledge (docs/methods.md).

AlphaEdit (Fang et al., ICLR 2025) projects each layer's update onto P = Û Ûᵀ, Û the
eigenvectors of the keys' second moment C with eigenvalues below a threshold (2e-2 in the
paper): keys of general text have almost no component there, so their outputs do not move.
Instead of MEMIT's λC it solves

    Δᵀ = solve(P (K Kᵀ + K_p K_pᵀ) + α I, P K Rᵀ)

where K_p K_pᵀ is the running sum over the keys of earlier edits, so that later batches do not
overwrite earlier ones. That sum is state carried from batch to batch
(:class:`AlphaEditState`): ``api.sequential_edit`` and ``fedit eval --sequential`` carry it,
a single edit starts from none. Targets, keys, the layer loop and the Gemma-specific handling
are MEMIT's (``memit.spread_over_layers``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fedit.core import activations
from fedit.core.solve import alphaedit_delta
from fedit.core.tokens import validate_for_tokenizer
from fedit.errors import FeditError, HparamsError
from fedit.methods.base import EditOutcome, Resources
from fedit.methods.memit import (MemitHparams, block_residual, spread_over_layers,
                                 to_weight_deltas)
from fedit.methods.targets import targets_for
from fedit.requests import EditRequest


@dataclass
class AlphaEditHparams(MemitHparams):
    """MEMIT's options plus the null-space threshold and α; ``mom2_update_weight`` is unused."""

    nullspace_threshold: float = 2e-2  # eigenvalues of C below this span the null space
    alpha: float = 10.0  # ridge α of the projected solve ("L2" in the reference code)

    def __post_init__(self):
        super().__post_init__()
        if self.nullspace_threshold <= 0 or self.alpha < 0:
            raise HparamsError(f"nullspace_threshold must be > 0 and alpha ≥ 0, got {self.nullspace_threshold} "
                               f"and {self.alpha}.", "use the paper's 2e-2 and 10, or values tuned for the model.")


@dataclass
class AlphaEditState:
    """Σ K_p K_pᵀ per edited layer ([d_in, d_in], float32) over every edit applied so far.

    Describes the model after the edit that returned it has been applied; pass it to the next
    sequential batch. Tied to the base model and the edited layers it was built with.
    """

    kk: dict[int, torch.Tensor] = field(default_factory=dict)
    edits: int = 0
    fingerprint: str | None = None

    def check(self, lm, layers: list[int]) -> None:
        if self.fingerprint is not None and self.fingerprint != lm.identity()["fingerprint"]:
            raise FeditError("this AlphaEdit state was built on another base model.",
                             "start the sequence from no state, or use the model the state came from.")
        if self.kk and sorted(self.kk) != sorted(layers):
            raise HparamsError(f"this AlphaEdit state holds layers {sorted(self.kk)}, the edit uses {layers}.",
                               "keep the same layers across a sequence of edits.")


def compute_alphaedit(lm, requests: list[EditRequest], hp: AlphaEditHparams, res: Resources,
                      zs: torch.Tensor | None = None, state: AlphaEditState | None = None) -> EditOutcome:
    """AlphaEdit deltas for a batch; the model is unchanged at the end.

    ``state`` holds the keys of the edits applied before (None: this is the first). The
    returned ``outcome.state`` adds this batch's keys, read on the model with the new deltas in
    place; it is not modified in place. ``zs`` [n, d_model] may supply precomputed targets.
    """
    t0 = time.perf_counter()
    validate_for_tokenizer(lm.tokenizer, requests, lm.model)
    layers, L = hp.layers, hp.layers[-1]
    if state is not None:
        state.check(lm, layers)
    groups = res.templates(lm, hp.context_template_length_params)
    targets, t_target = [], 0.0
    if zs is None:
        zs, targets, t_target = targets_for(lm, requests, hp, groups, res.target_store())
    P = res.projectors(lm, layers, hp.mom2_samples, hp.mom2_seq_len, hp.nullspace_threshold)
    prev = state.kk if state is not None else {}
    new_kk: dict[int, torch.Tensor] = {}

    def solve(l, K, R):
        return alphaedit_delta(K, R, P[l], hp.alpha, prev.get(l))

    def record_keys():  # the keys of this batch on the edited model join K_p
        ks = activations.keys(lm, layers, requests, groups)
        for l in layers:
            kk = (ks[l].T.float() @ ks[l].float())
            new_kk[l] = prev[l] + kk.to(prev[l].device) if l in prev else kk

    deltas, diag = spread_over_layers(lm, requests, hp, groups, block_residual(lm, zs, L), solve,
                                      on_edited=record_keys)
    diag.pop("layer_vectors")  # not a plain solve: these vectors alone do not give the update
    diag["zs"] = zs.float().cpu()
    diag["null_space_rank"] = {l: int(round(float(P[l].trace()))) for l in layers}
    new_state = AlphaEditState(kk=new_kk, edits=(state.edits if state else 0) + len(requests),
                               fingerprint=lm.identity()["fingerprint"])
    return EditOutcome(deltas=to_weight_deltas(lm, deltas, "alphaedit", requests, hp), targets=targets,
                       seconds=time.perf_counter() - t0, target_seconds=t_target, diagnostics=diag,
                       state=new_state)
