"""MEMIT: many facts, spread over several layers (docs/methods.md)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.profiler import record_function

from fedit.core import activations
from fedit.core.pullback import pull_back
from fedit.core.solve import memit_delta
from fedit.core.targets import TargetConfig, speed_switches
from fedit.core.tokens import validate_for_tokenizer
from fedit.deltas import WeightDeltas
from fedit.errors import HparamsError
from fedit.methods.base import EditOutcome, Resources
from fedit.methods.hparams import autocast_for, check_vocab_subset
from fedit.methods.targets import targets_for
from fedit.methods.vectors import EditVectors, compute_memit_base
from fedit.requests import EditRequest


@dataclass
class MemitHparams:
    layers: list[int]
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    nll_stop: float = 0.05
    # "float32" (default) or "bfloat16"/"float16": target optimisation under torch.autocast
    # (~1.4x faster on CPUs with AMX, z within ~1 %; weights and solves stay float32)
    target_precision: str = "float32"
    # False: target optimisation (core.targets.SPEED_SWITCHES) and pull-back without their
    # speed-ups, the path benchmarks/bench_speed.py compares against; the same numbers to
    # float noise either way
    speedups: bool = True
    # > 0: between exact steps the target loss reads only this many candidate tokens per position
    # (and the target tokens), the rest of the softmax's normaliser frozen; exact every
    # vocab_refresh steps (core.targets.TargetConfig.vocab_subset). Changes z slightly; 0: off
    vocab_subset: int = 0
    vocab_refresh: int = 5
    mom2_update_weight: float = 15000.0
    mom2_samples: int = 1000
    mom2_seq_len: int = 128
    context_template_length_params: list[list[int]] = field(default_factory=lambda: [[10, 5]])
    # 0: plain MEMIT (a change at layer l arrives unchanged at L). > 0: carry each layer's
    # share back through the blocks above it with this many steps (core.pullback); needed
    # where norms wrap every sublayer (Gemma 2/3).
    pullback_steps: int = 0
    # Where the residual is not a sum (pullback on), a lower layer's update can still push h_L
    # away from z; with backtrack_steps > 0 it is halved up to that many times until the mean
    # residual at L shrinks (0 if none does). 0: plain MEMIT, every update taken whole.
    backtrack_steps: int = 0
    v_batch_size: int = 16  # requests optimised together in one forward pass (results do not depend on it)
    # > 1 (CPU): that many one-thread worker processes optimise target batches side by side
    # (core.workers); results do not depend on it. Set it to the number of cores when a run has
    # several batches of targets (docs/benchmarks.md)
    v_workers: int = 1
    # "layerwise": each layer's keys and residual are measured on the model as edited by the
    # layers below (MEMIT as published). "base": all from the unedited base model, all layers
    # solved at once from their layer sums (methods.vectors; CollabEdit's form, FedEdit private mode).
    form: str = "layerwise"

    def __post_init__(self):
        if self.mom2_update_weight < 0:
            raise HparamsError(f"mom2_update_weight must be ≥ 0, got {self.mom2_update_weight}.",
                               "use e.g. 15000 (GPT-J) or 20000 (GPT-2 XL).")
        autocast_for(self.target_precision)  # validates
        check_vocab_subset(self.vocab_subset, self.vocab_refresh)
        if self.v_num_grad_steps < 0 or self.v_lr <= 0 or self.clamp_norm_factor <= 0:
            raise HparamsError("v_num_grad_steps must be ≥ 0 and v_lr, clamp_norm_factor > 0.",
                               "fix the values in the hyperparameter file.")
        if self.v_batch_size < 1 or self.v_workers < 1:
            raise HparamsError(f"v_batch_size and v_workers must be ≥ 1, got {self.v_batch_size}, {self.v_workers}.",
                               "use e.g. v_batch_size 16 and v_workers 1 (or the number of cores).")
        if self.form not in ("layerwise", "base"):
            raise HparamsError(f"form must be 'layerwise' or 'base', got {self.form!r}.",
                               "use 'layerwise' (MEMIT as published) or 'base' (all from the unedited model).")

    def target_config(self) -> TargetConfig:
        return TargetConfig(layer=self.layers[-1], site="block", steps=self.v_num_grad_steps, lr=self.v_lr,
                            clamp=self.clamp_norm_factor, kl_factor=self.kl_factor,
                            weight_decay=self.v_weight_decay, nll_stop=self.nll_stop,
                            autocast=autocast_for(self.target_precision), vocab_subset=self.vocab_subset,
                            vocab_refresh=self.vocab_refresh, **speed_switches(self.speedups))


@dataclass
class Residual:
    """What is still missing at the last edited layer L, measured on the model as it is now.

    ``modules`` are read at the subject's last token of the bare prompt (labels to
    ``"<module>:input|output"``, as in :func:`activations.at_subject`); ``fn`` turns them into
    the missing change of block L's output, [n, d_model]. MEMIT: z − h_L.
    """

    modules: dict[str, str]
    fn: Callable[[dict[str, torch.Tensor]], torch.Tensor]

    def measure(self, lm, requests, extra: dict[str, str] | None = None):
        acts = activations.at_subject(lm, requests, ["{}"], {**self.modules, **(extra or {})})
        return self.fn(acts).float(), acts


def spread_over_layers(lm, requests: list[EditRequest], hp: MemitHparams, groups: list[list[str]],
                       residual: Residual, solve: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
                       share_power: float = 1.0,
                       on_edited: Callable[[], None] | None = None) -> tuple[dict[int, torch.Tensor], dict]:
    """MEMIT's layer loop, shared by MEMIT, PMET and AlphaEdit; the model is unchanged at the end.

    For each layer l of ``hp.layers`` in ascending order, on the model as edited so far: keys K
    at l, the residual r at L (``residual``), the share r / (layers left)^``share_power``
    (MEMIT 1, PMET ½), carried back to l (``hp.pullback_steps``) and into W_out's output space,
    Δ = ``solve(l, K, R)`` ([d_out, d_in]), applied (halved while it does not shrink the
    residual, ``hp.backtrack_steps``). ``on_edited`` runs once every layer is written, before
    the weights are restored (AlphaEdit reads the edited keys there). Returns the deltas per
    layer ([d_out, d_in]) and diagnostics (``layers``, ``residual_norms`` before the first layer and after
    each one, ``pullback``, ``step_scales``).
    """
    ad, layers, L = lm.adapter, hp.layers, hp.layers[-1]
    params = dict(lm.model.named_parameters())
    names = {l: ad.w_out_param_name(l) for l in layers}
    originals = {l: params[names[l]].detach().clone() for l in layers}
    deltas: dict[int, torch.Tensor] = {}
    residual_norms: list[float] = []
    pullback: list[dict] = []
    steps: list[float] = []
    vec_keys: dict[int, torch.Tensor] = {}
    vec_resids: dict[int, torch.Tensor] = {}

    def mean_residual() -> float:
        return float(residual.measure(lm, requests)[0].norm(dim=1).mean())

    try:
        for i, l in enumerate(layers):
            with record_function("edit.keys"):
                K = activations.keys(lm, [l], requests, groups)[l]  # [n, d_in]
            with record_function("edit.residual"):
                resid, cur = residual.measure(lm, requests, {"__o": f"{ad.w_out_name(l)}:output"})  # [n, d_model]
            residual_norms.append(float(resid.norm(dim=1).mean()))
            want = resid / (len(layers) - i) ** share_power
            if hp.pullback_steps > 0 and l != L:
                with record_function("edit.pullback"):
                    want, err0, err1 = pull_back(lm, requests, l, L, want, steps=hp.pullback_steps,
                                                 suffix=getattr(hp, "speedups", True))
                pullback.append({"layer": l, "error_plain": err0, "error_pulled_back": err1})
            R = ad.residual_to_w_out(l, want, cur["__o"][:, 0])
            with record_function("edit.solve"):
                delta = solve(l, K, R)
            before = params[names[l]].detach().clone()
            scale = 1.0
            for _ in range(hp.backtrack_steps + 1):
                with torch.no_grad():
                    params[names[l]].copy_(before + ad.to_param_layout(scale * delta).to(before.dtype))
                if hp.backtrack_steps == 0 or l == L:
                    break
                with record_function("edit.backtrack"):
                    if mean_residual() < residual_norms[-1]:
                        break
                scale /= 2
            else:
                scale = 0.0  # no step size helped: this layer does not write
                with torch.no_grad():
                    params[names[l]].copy_(before)
            steps.append(scale)
            deltas[l] = scale * delta
            vec_keys[l], vec_resids[l] = K.float().cpu(), (scale * R).float().cpu()
        with record_function("edit.residual"):
            residual_norms.append(mean_residual())
        if on_edited is not None:
            on_edited()
    finally:
        with torch.no_grad():
            for l in layers:
                params[names[l]].copy_(originals[l])
    return deltas, {"layers": list(layers), "residual_norms": residual_norms, "pullback": pullback, "step_scales": steps,
                    # the keys and W_out-space residuals each layer was solved with (scaled as applied)
                    "layer_vectors": {"keys": vec_keys, "resids": vec_resids}}


def with_vectors(lm, zs: torch.Tensor, diag: dict) -> dict:
    """Turn the loop's layer vectors into ``diag["vectors"]``: for methods whose every layer is
    MEMIT's plain solve, the update is exactly the layer-sums solve of these per-fact vectors
    (FedEdit's private payload)."""
    lv = diag.pop("layer_vectors")
    diag["vectors"] = EditVectors(zs.float().cpu(), lv["keys"], lv["resids"], lm.identity()["fingerprint"])
    return diag


def to_weight_deltas(lm, deltas: dict[int, torch.Tensor], method: str, requests: list[EditRequest],
                     hp) -> WeightDeltas:
    """Per-layer [d_out, d_in] updates as :class:`WeightDeltas` in the parameters' stored layout."""
    return WeightDeltas.from_layers(lm, deltas, method, requests, hp)


def block_residual(lm, zs: torch.Tensor, layer: int) -> Residual:
    """MEMIT's residual: targets z [n, d_model] minus block ``layer``'s output now."""
    zs = zs.to(lm.device).float()
    return Residual({"h": f"{lm.adapter.block_name(layer)}:output"}, lambda a: zs - a["h"][:, 0].float())


def compute_memit(lm, requests: list[EditRequest], hp: MemitHparams, res: Resources,
                  zs: torch.Tensor | None = None) -> EditOutcome:
    """MEMIT deltas for a batch of requests; the model is unchanged at the end.

    ``zs`` [n, d_model] may supply precomputed targets (e.g. reused MKVs); otherwise they are
    optimised here. Layers are updated in ascending order, each measured on the model as
    edited so far; ``diagnostics["residual_norms"]`` holds the mean ‖z − h_L‖ before the first
    layer and after each one, which must shrink.
    """
    if hp.form == "base":
        return compute_memit_base(lm, requests, hp, res, zs)
    t0 = time.perf_counter()
    validate_for_tokenizer(lm.tokenizer, requests, lm.model)
    layers, L = hp.layers, hp.layers[-1]
    groups = res.templates(lm, hp.context_template_length_params)
    targets, t_target = [], 0.0
    if zs is None:
        zs, targets, t_target = targets_for(lm, requests, hp, groups, res.target_store())
    with record_function("edit.statistics"):
        C = res.second_moments(lm, layers, hp.mom2_samples, hp.mom2_seq_len)
    deltas, diag = spread_over_layers(lm, requests, hp, groups, block_residual(lm, zs, L),
                                      lambda l, K, R: memit_delta(K, R, C[l], hp.mom2_update_weight))
    with_vectors(lm, zs, diag)
    return EditOutcome(deltas=to_weight_deltas(lm, deltas, "memit", requests, hp), targets=targets,
                       seconds=time.perf_counter() - t0, target_seconds=t_target, diagnostics=diag)
