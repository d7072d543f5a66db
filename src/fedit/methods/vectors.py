"""MEMIT in its base-model form: per-fact edit vectors and their layer sums (R Kᵀ, K Kᵀ).

Layer-by-layer MEMIT (``memit.compute_memit``) measures each layer's keys and residual on the
model as edited by the layers below, so it needs the requests' text at every step. In the
base-model form every quantity comes from the one shared base model:

    z          the target at the last edited layer L (FLEKE's MKV)
    k_l        the key at layer l (input of W_out at the subject's last token)
    r_l        the change of W_out's output at layer l that moves h_L by (z − h_L) / |layers|

and every layer is solved at once from the layer sums

    Δ_l = (Σ r_l k_lᵀ) (λ C_l + C₁ + Σ k_l k_lᵀ)⁻¹

(C₁: the running covariance of earlier applied edits, zero for one edit). The solve needs
only the vectors, not the text, and sums over any set of facts: this is what a federated
client ships instead of its requests (FedEdit private mode) and what CollabEdit merges. The
split of the residual into equal shares is what layer-by-layer MEMIT does when every layer
realises its share exactly (after layer i the residual is (1 − (i+1)/|layers|)·(z − h_L), and
the next layer takes 1/(|layers| − i − 1) of it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

import torch

from fedit.core import activations
from fedit.core.layer_sums import LayerSums
from fedit.core.pullback import pull_back
from fedit.core.solve import delta_from_sums
from fedit.core.tokens import validate_for_tokenizer
from fedit.deltas import WeightDeltas
from fedit.errors import FeditError
from fedit.methods.base import EditOutcome
from fedit.methods.targets import targets_for
from fedit.requests import EditRequest


class VectorError(FeditError):
    """Edit vectors that do not fit together or do not fit the model."""


@dataclass(init=False)
class EditVectors:
    """Edit vectors of n facts, measured on one base model. Rows are facts."""

    zs: torch.Tensor  # [n, d_model]
    keys: dict[int, torch.Tensor]  # layer -> [n, d_in]
    resids: dict[int, torch.Tensor]  # layer -> [n, d_out]
    base_fingerprint: str = ""  # fingerprint of the base model they were measured on

    def __init__(self, zs: torch.Tensor, keys: dict[int, torch.Tensor], resids: dict[int, torch.Tensor],
                 base_fingerprint: str = ""):
        self.zs, self.keys, self.resids = zs, keys, resids
        self.base_fingerprint = base_fingerprint
        self._check()

    def _check(self) -> None:
        n = self.zs.shape[0]
        if sorted(self.keys) != sorted(self.resids):
            raise VectorError(f"keys are for layers {sorted(self.keys)}, residuals for {sorted(self.resids)}.",
                              "send both for the same layers.")
        for l in self.keys:
            if self.keys[l].shape[0] != n or self.resids[l].shape[0] != n:
                raise VectorError(f"layer {l} has {self.keys[l].shape[0]} keys and {self.resids[l].shape[0]} "
                                  f"residuals for {n} targets.", "send one key and one residual per fact and layer.")

    @property
    def layers(self) -> list[int]:
        return sorted(self.keys)

    def __len__(self) -> int:
        return self.zs.shape[0]

    def select(self, idx: Iterable[int]) -> "EditVectors":
        ix = torch.as_tensor(list(idx), dtype=torch.long)
        return EditVectors(self.zs[ix], {l: k[ix] for l, k in self.keys.items()},
                           {l: r[ix] for l, r in self.resids.items()}, self.base_fingerprint)

    @staticmethod
    def cat(parts: list["EditVectors"]) -> "EditVectors":
        parts = [p for p in parts if len(p)]
        if not parts:
            raise VectorError("no edit vectors to join.", "pass at least one non-empty set.")
        layers, bases = parts[0].layers, {p.base_fingerprint for p in parts}
        if any(p.layers != layers for p in parts):
            raise VectorError(f"edit vectors for different layers: {[p.layers for p in parts]}.",
                              "compute every client's vectors with the same hyperparameters (layers).")
        if len(bases) > 1:
            raise VectorError(f"edit vectors from different base models {sorted(bases)}.",
                              "every participant must start from the same base model.")
        return EditVectors(torch.cat([p.zs for p in parts]),
                           {l: torch.cat([p.keys[l] for p in parts]) for l in layers},
                           {l: torch.cat([p.resids[l] for p in parts]) for l in layers}, parts[0].base_fingerprint)

    # One fact as named tensors (a federated payload) and back.
    def fact_tensors(self, i: int) -> dict[str, torch.Tensor]:
        out = {"z": self.zs[i].contiguous()}
        for l in self.layers:
            out[f"key.{l}"] = self.keys[l][i].contiguous()
            out[f"resid.{l}"] = self.resids[l][i].contiguous()
        return out

    @staticmethod
    def from_fact_tensors(facts: list[dict[str, torch.Tensor]], base_fingerprint: str = "") -> "EditVectors":
        """The vectors of ``facts`` (each as :meth:`fact_tensors` gives it)."""
        if not facts:
            raise VectorError("no facts given.", "pass at least one fact's tensors.")
        layers = sorted(int(k.split(".", 1)[1]) for k in facts[0] if k.startswith("key."))
        for i, f in enumerate(facts):
            need = {"z"} | {f"key.{l}" for l in layers} | {f"resid.{l}" for l in layers}
            if set(f) != need:
                raise VectorError(f"fact {i} carries tensors {sorted(f)}, expected {sorted(need)}.",
                                  "send z, key.<layer> and resid.<layer> for the same layers in every fact.")
        stack = lambda name: torch.stack([f[name].float() for f in facts])  # noqa: E731
        return EditVectors(stack("z"), {l: stack(f"key.{l}") for l in layers},
                           {l: stack(f"resid.{l}") for l in layers}, base_fingerprint)


def layer_sums(vectors: EditVectors) -> dict[int, LayerSums]:
    """R Kᵀ and K Kᵀ of ``vectors`` at each of their layers (float64)."""
    return {l: LayerSums.of(vectors.keys[l], vectors.resids[l]) for l in vectors.layers}


def check_finite(vectors: EditVectors, what: str = "edit vectors") -> None:
    bad = [name for name, t in [("z", vectors.zs), *[(f"key.{l}", k) for l, k in vectors.keys.items()],
                                *[(f"resid.{l}", r) for l, r in vectors.resids.items()]]
           if not torch.isfinite(t).all()]
    if bad:
        raise VectorError(f"{what} hold NaN or Inf in {bad}.", "recompute them; these cannot be used.")


def measure_vectors(lm, requests: list[EditRequest], layers: list[int], zs: torch.Tensor,
                    groups: list[list[str]], pullback_steps: int = 0) -> EditVectors:
    """Keys and W_out-space residual shares of ``requests`` for targets ``zs``, on ``lm`` as it is."""
    ad, L = lm.adapter, layers[-1]
    zs = zs.to(lm.device).float()
    keys = activations.keys(lm, layers, requests, groups)
    mods = {"h": f"{ad.block_name(L)}:output"} | {l: f"{ad.w_out_name(l)}:output" for l in layers}
    cur = activations.at_subject(lm, requests, ["{}"], mods)
    share = (zs - cur["h"][:, 0].float()) / len(layers)
    resids = {}
    for l in layers:
        want = share
        if pullback_steps > 0 and l != L:
            want, _, _ = pull_back(lm, requests, l, L, share, steps=pullback_steps)
        resids[l] = ad.residual_to_w_out(l, want, cur[l][:, 0]).float().cpu()
    return EditVectors(zs.cpu(), {l: k.float().cpu() for l, k in keys.items()}, resids,
                       lm.identity()["fingerprint"])


def compute_vectors(lm, requests: list[EditRequest], hp, res, zs: torch.Tensor | None = None):
    """Edit vectors of ``requests`` on ``lm`` (the base model); optimises z unless given.

    Returns (vectors, per-request target reports, seconds spent optimising targets).
    """
    validate_for_tokenizer(lm.tokenizer, requests, lm.model)
    groups = res.templates(lm, hp.context_template_length_params)
    reports, t_target = [], 0.0
    if zs is None:
        zs, reports, t_target = targets_for(lm, requests, hp, groups, res.target_store())
    vectors = measure_vectors(lm, requests, hp.layers, zs, groups, hp.pullback_steps)
    return vectors, reports, t_target


def deltas_from_sums(lm, sums: dict[int, LayerSums], hp, res, C1: dict[int, torch.Tensor] | None = None,
                     method: str = "memit", requests: list[dict] | None = None) -> WeightDeltas:
    """The weight deltas of the base-model MEMIT solve for the summed ``sums`` of each layer."""
    layers = sorted(sums)
    C = res.second_moments(lm, layers, hp.mom2_samples, hp.mom2_seq_len)
    out = {l: delta_from_sums(sums[l], C[l].to(sums[l].KK.device), hp.mom2_update_weight,
                              None if C1 is None else C1.get(l)) for l in layers}
    return WeightDeltas.from_layers(lm, out, method, requests, hp)


def compute_memit_base(lm, requests: list[EditRequest], hp, res, zs: torch.Tensor | None = None):
    """MEMIT with every key and residual taken from the unedited model (CollabEdit's form)."""
    t0 = time.perf_counter()
    vectors, reports, t_target = compute_vectors(lm, requests, hp, res, zs)
    wd = deltas_from_sums(lm, layer_sums(vectors), hp, res, requests=[r.to_dict() for r in requests])
    return EditOutcome(deltas=wd, targets=reports, seconds=time.perf_counter() - t0, target_seconds=t_target,
                       diagnostics={"form": "base", "vectors": vectors})

