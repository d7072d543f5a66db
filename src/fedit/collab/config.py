"""The settings of a CollabEdit run that the server applies (merges, conflict policy, C₁, reference)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from fedit.collab.merge import MERGES, MergeConfig, MergeError
from fedit.collab.privacy import DPConfig
from fedit.collab.protocol import POLICIES, ProtocolError

# "base": one exchange of statistics per round, all measured on the published model (the
# CollabEdit paper's protocol); "layerwise": one exchange per edited layer, lowest first, each
# measured with this round's merged lower layers applied (equals MEMIT as published).
FORMS = ("base", "layerwise")


@dataclass
class CollabConfig:
    merges: tuple[str, ...] = ("collabedit",)
    conflict_policy: str = "reject"
    priority: list[str] | None = None
    ties_density: float = 0.2
    ties_scale: float = 0.4
    c1: bool = True  # keep the running covariance of applied edits (CollabEdit only)
    c1_weight: float = 1.0  # C₁ += c1_weight · KKᵀ (1: the global solve; the paper's formula: λ)
    residual_tol: float = 1e-6  # a fact with ‖z − h‖/‖h‖ ≤ tol is already said by the model
    reference: bool = True  # global MEMIT over the union (base form)
    layerwise_reference: bool = True  # and MEMIT as published, with the same z
    dataset: str = "counterfact"
    form: str = "base"  # CollabEdit's form, one of FORMS (the baselines always merge base-form updates)
    dp: DPConfig | None = None  # clipped, noisy sums for CollabEdit (``collab.privacy``)
    salt: bytes = field(default_factory=lambda: os.urandom(32), repr=False)

    def __post_init__(self):
        self.merges = tuple(self.merges)
        for m in self.merges:
            MergeConfig(m, self.ties_density, self.ties_scale)  # validates
        if not self.merges:
            raise MergeError("no merge method given.", f"use one or more of {', '.join(MERGES)}.")
        if self.conflict_policy not in POLICIES:
            raise ProtocolError(f"unknown conflict policy {self.conflict_policy!r}.", f"use one of {', '.join(POLICIES)}.")
        if self.form not in FORMS:
            raise MergeError(f"unknown form {self.form!r}.", f"use one of {', '.join(FORMS)}.")
        if self.dp is not None and (self.form != "base" or set(self.merges) != {"collabedit"}):
            raise MergeError("differential privacy covers CollabEdit's sums in the base form only.",
                             "run --merge collabedit --form base with DP (the baselines send each client's Δ in clear).")
        if self.c1_weight < 0:
            raise MergeError(f"c1_weight must be ≥ 0, got {self.c1_weight}.", "use 1 (the global solve).")

    def merge_config(self, method: str) -> MergeConfig:
        return MergeConfig(method, self.ties_density, self.ties_scale)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("salt")
        d["merges"] = list(self.merges)
        return d


def for_form(hparams, form: str):
    """The MEMIT hyperparameters a run of ``form`` uses: clients measure their vectors in the base
    form either way; the layer-sequential form has no federated counterpart of MEMIT's
    backtracking (it halves a layer's step by looking at every fact's residual), so it is off."""
    hp = dataclasses.replace(hparams, form="base")
    if form == "layerwise" and getattr(hp, "backtrack_steps", 0):
        hp = dataclasses.replace(hp, backtrack_steps=0)
    return hp
