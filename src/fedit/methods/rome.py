"""ROME: one fact, one layer, a rank-one update (docs/methods.md)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch.profiler import record_function

from fedit.core import activations
from fedit.core.solve import rome_delta
from fedit.core.targets import TargetConfig, compute_targets, speed_switches, target_summaries
from fedit.core.templates import flat
from fedit.core.tokens import validate_for_tokenizer
from fedit.deltas import WeightDeltas
from fedit.errors import HparamsError
from fedit.methods.base import EditOutcome, Resources
from fedit.methods.hparams import autocast_for, check_vocab_subset
from fedit.requests import EditRequest


@dataclass
class RomeHparams:
    layers: list[int]
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
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
    mom2_adjustment: bool = True
    mom2_samples: int = 1000
    mom2_seq_len: int = 128
    context_template_length_params: list[list[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])

    def __post_init__(self):
        if len(self.layers) != 1:
            raise HparamsError(f"ROME edits exactly one layer, got layers={self.layers}.",
                               "pass one layer (--layers 5) or use MEMIT for several.")
        autocast_for(self.target_precision)  # validates
        check_vocab_subset(self.vocab_subset, self.vocab_refresh)
        if self.v_num_grad_steps < 0 or self.v_lr <= 0 or self.clamp_norm_factor <= 0:
            raise HparamsError("v_num_grad_steps must be ≥ 0 and v_lr, clamp_norm_factor > 0.",
                               "fix the values in the hyperparameter file.")

    def target_config(self) -> TargetConfig:
        return TargetConfig(layer=self.layers[0], site="w_out", steps=self.v_num_grad_steps, lr=self.v_lr,
                            clamp=self.clamp_norm_factor, kl_factor=self.kl_factor,
                            weight_decay=self.v_weight_decay, nll_stop=self.nll_stop,
                            autocast=autocast_for(self.target_precision), vocab_subset=self.vocab_subset,
                            vocab_refresh=self.vocab_refresh, **speed_switches(self.speedups))


def compute_rome(lm, requests: list[EditRequest], hp: RomeHparams, res: Resources) -> EditOutcome:
    """ROME deltas for ``requests``, edited one after another (each on the model edited so far).

    The model is the same at the end as at the start; apply ``outcome.deltas`` to keep the edit.
    """
    t0 = time.perf_counter()
    validate_for_tokenizer(lm.tokenizer, requests, lm.model)
    ad, layer = lm.adapter, hp.layers[0]
    groups = res.templates(lm, hp.context_template_length_params)
    templates = flat(groups)
    with record_function("edit.statistics"):
        C = res.second_moments(lm, [layer], hp.mom2_samples, hp.mom2_seq_len)[layer] if hp.mom2_adjustment else None
    w_name = ad.w_out_param_name(layer)
    param = dict(lm.model.named_parameters())[w_name]
    original = param.detach().clone()
    total = torch.zeros(ad.w_out_dims(layer), dtype=torch.float64, device=lm.device)
    targets, t_target = [], 0.0
    try:
        for req in requests:
            with record_function("edit.keys"):
                k_avg = activations.keys(lm, [layer], [req], [templates])[layer][0]
            tr, = compute_targets(lm, [req], templates, hp.target_config(), cache=res.target_store())
            t_target += tr.seconds
            with record_function("edit.keys"):
                io = activations.at_subject(lm, [req], ["{}"], {"k": f"{ad.w_out_name(layer)}:input",
                                                                "wk": f"{ad.w_out_name(layer)}:output"})
            with record_function("edit.solve"):
                delta = rome_delta(C, k_avg, io["k"][0, 0], io["wk"][0, 0], tr.z)
            with torch.no_grad():
                param.add_(ad.to_param_layout(delta).to(param.dtype))
            total += delta
            targets += target_summaries([req], [tr])
    finally:
        with torch.no_grad():
            param.copy_(original)
    deltas = WeightDeltas.from_layers(lm, {layer: total}, "rome", requests, hp)
    return EditOutcome(deltas=deltas, targets=targets, seconds=time.perf_counter() - t0, target_seconds=t_target)
