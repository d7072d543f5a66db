"""Merging the clients' edits: CollabEdit's non-destructive merge and the destructive baselines.

Every function works on per-layer tensors in the math layout of W_out, [d_out, d_in], float64
(``fedit.methods.vectors`` convention); converting to a model's parameter layout is the
caller's business.

``collabedit``
    Δ = (Σᵢ RᵢKᵢᵀ)(λC₀ + C₁ + Σᵢ KᵢKᵢᵀ)⁻¹ from the summed sufficient statistics: exactly the
    base-form MEMIT solve over the union of the clients' facts.
``task-arithmetic``
    ΣᵢΔᵢ, each Δᵢ = RᵢKᵢᵀ(λC₀ + KᵢKᵢᵀ)⁻¹ the client's own MEMIT update from the same model.
``average``
    (1/m) ΣᵢΔᵢ over the m clients that edited something (the unweighted "simple average").
``fedavg``
    Σᵢ nᵢΔᵢ / Σᵢ nᵢ, nᵢ the client's number of edits: McMahan et al.'s FedAvg weights each
    client by its local sample count. With equal counts it equals ``average``.
``ties``
    TIES merging (Yadav et al. 2023): per client keep the ``density`` fraction of entries with
    the largest magnitude over the whole update (all layers together, as the reference
    implementation flattens the task vector), elect each entry's sign as the sign of the sum of
    the trimmed updates, average the trimmed entries that agree with it (disjoint mean), scale
    by ``scale``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedit.errors import FeditError
from fedit.methods.vectors import LayerSums, delta_from_sums

MERGES = ("collabedit", "task-arithmetic", "average", "ties", "fedavg")

Stats = dict[int, LayerSums]
Delta = dict[int, torch.Tensor]


class MergeError(FeditError):
    """Client updates or statistics that cannot be merged as asked."""


@dataclass(frozen=True)
class MergeConfig:
    method: str = "collabedit"
    ties_density: float = 0.2  # fraction of each client's entries TIES keeps
    ties_scale: float = 0.4  # TIES's final scaling λ

    def __post_init__(self):
        if self.method not in MERGES:
            raise MergeError(f"unknown merge method {self.method!r}.", f"use one of {', '.join(MERGES)}.")
        if not 0.0 < self.ties_density <= 1.0:
            raise MergeError(f"TIES density must lie in (0, 1], got {self.ties_density}.",
                             "use e.g. 0.2 (keep the top 20% magnitudes).")
        if not math.isfinite(self.ties_scale) or self.ties_scale <= 0:
            raise MergeError(f"TIES scale must be a positive number, got {self.ties_scale}.", "use e.g. 0.4.")


def sum_stats(parts: list[Stats]) -> Stats:
    """Σ over clients of per-layer statistics; clients without facts may be left out."""
    parts = [p for p in parts if p]
    layers = _layers_of(parts, "statistics")
    out = {}
    for l in layers:
        acc = parts[0][l]
        for p in parts[1:]:
            if p[l].RK.shape != acc.RK.shape or p[l].KK.shape != acc.KK.shape:
                raise MergeError(f"layer {l}: statistics of shapes {tuple(p[l].RK.shape)} and {tuple(acc.RK.shape)}.",
                                 "every client must use the same base model.")
            acc = acc + p[l]
        out[l] = acc
    return out


def _check_C(stats: Stats, C0: dict[int, torch.Tensor]) -> None:
    missing = [l for l in stats if l not in C0]
    if missing:
        raise MergeError(f"no second moment C₀ for layer(s) {missing}.", "compute statistics for every edited layer.")


def solve(stats: Stats, C0: dict[int, torch.Tensor], lam: float, C1: dict[int, torch.Tensor] | None = None) -> Delta:
    """Base-form MEMIT solve per layer: Δ_l = RK_l (λC₀_l + C₁_l + KK_l)⁻¹ (float64)."""
    _check_C(stats, C0)
    return {l: delta_from_sums(st, C0[l].to(st.KK.device), lam, None if C1 is None else C1.get(l))
            for l, st in stats.items()}


def collabedit(client_stats: list[Stats], C0: dict[int, torch.Tensor], lam: float,
               C1: dict[int, torch.Tensor] | None = None) -> Delta:
    """The non-destructive merge: one solve over the summed statistics of all clients."""
    return solve(sum_stats(client_stats), C0, lam, C1)


def _layers_of(parts: list[dict], what: str = "updates") -> list[int]:
    """The layers every client's per-layer ``what`` covers (the same for all, or an error)."""
    parts = [d for d in parts if d]
    if not parts:
        raise MergeError(f"no client sent {what}.", "at least one client must edit one fact.")
    layers = sorted(parts[0])
    if any(sorted(d) != layers for d in parts):
        raise MergeError(f"clients sent {what} for different layers: {[sorted(d) for d in parts]}.",
                         "run every client with the same hyperparameters (layers).")
    return layers


def task_arithmetic(deltas: list[Delta]) -> Delta:
    """Σᵢ Δᵢ."""
    layers = _layers_of(deltas)
    return {l: torch.stack([d[l].double() for d in deltas if d]).sum(0) for l in layers}


def average(deltas: list[Delta]) -> Delta:
    """Unweighted mean of the updates of the clients that sent one."""
    return fedavg(deltas, [1.0 if d else 0.0 for d in deltas])


def fedavg(deltas: list[Delta], weights: list[float]) -> Delta:
    """Σᵢ wᵢΔᵢ / Σᵢ wᵢ (FedAvg: wᵢ = the client's number of edits)."""
    if len(weights) != len(deltas):
        raise MergeError(f"{len(deltas)} updates but {len(weights)} weights.", "give one weight per client.")
    if any(w < 0 or not math.isfinite(w) for w in weights):
        raise MergeError(f"FedAvg weights must be finite and ≥ 0, got {weights}.", "weight by edit counts.")
    pairs = [(d, w) for d, w in zip(deltas, weights) if d and w > 0]
    if not pairs:
        raise MergeError("no client sent an update with a positive weight.", "at least one client must edit one fact.")
    layers = _layers_of([d for d, _ in pairs])
    total = sum(w for _, w in pairs)
    return {l: sum(w * d[l].double() for d, w in pairs) / total for l in layers}


def ties(deltas: list[Delta], density: float = 0.2, scale: float = 0.4) -> Delta:
    """TIES merging: trim to the top ``density`` magnitudes, elect signs, disjoint mean, scale.

    Trimming keeps, per client, every entry whose magnitude is at least the k-th largest over
    the client's whole update (k = ⌈density · entries⌉; ties at the threshold are kept).
    """
    MergeConfig(ties_density=density, ties_scale=scale)  # validates
    deltas = [d for d in deltas if d]
    layers = _layers_of(deltas)
    shapes = [deltas[0][l].shape for l in layers]
    flat = torch.stack([torch.cat([d[l].double().reshape(-1) for l in layers]) for d in deltas])  # [m, P]
    k = max(1, math.ceil(density * flat.shape[1]))
    thresh = flat.abs().topk(k, dim=1).values[:, -1:]  # [m, 1] k-th largest magnitude per client
    trimmed = torch.where(flat.abs() >= thresh, flat, torch.zeros_like(flat))
    sign = torch.sign(trimmed.sum(0))  # [P] elected sign (0 where the sum vanishes)
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    merged = scale * (trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)
    out, start = {}, 0
    for l, shp in zip(layers, shapes):
        n = math.prod(shp)
        out[l] = merged[start:start + n].reshape(shp)
        start += n
    return out


def client_deltas(client_stats: list[Stats], C0: dict[int, torch.Tensor], lam: float) -> list[Delta]:
    """Each client's own MEMIT update from the shared model (what the baselines merge)."""
    return [solve(s, C0, lam) if s else {} for s in client_stats]


def merge_updates(cfg: MergeConfig, deltas: list[Delta], counts: list[float]) -> Delta:
    """A baseline's merge of the clients' own updates ``deltas`` (``counts``: their edits, FedAvg's weights)."""
    if cfg.method == "task-arithmetic":
        return task_arithmetic(deltas)
    if cfg.method == "average":
        return average(deltas)
    if cfg.method == "fedavg":
        return fedavg(deltas, [float(c) for c in counts])
    if cfg.method == "ties":
        return ties(deltas, cfg.ties_density, cfg.ties_scale)
    raise MergeError(f"{cfg.method} does not merge updates.", "use collabedit() for the statistics merge.")


def merge(cfg: MergeConfig, client_stats: list[Stats], C0: dict[int, torch.Tensor], lam: float,
          C1: dict[int, torch.Tensor] | None = None, deltas: list[Delta] | None = None) -> Delta:
    """The merged update of ``cfg.method`` from the clients' statistics.

    ``C1`` (the running covariance of earlier rounds' edits) is used by ``collabedit`` only;
    the baselines merge the clients' own updates ``deltas`` (computed here from the statistics
    when not given). Weights for ``fedavg`` are the clients' edit counts (``LayerSums.n``).
    """
    if cfg.method == "collabedit":
        return collabedit(client_stats, C0, lam, C1)
    if deltas is None:
        deltas = client_deltas(client_stats, C0, lam)
    counts = [float(next(iter(s.values())).n) if s else 0.0 for s in client_stats]
    return merge_updates(cfg, deltas, counts)
