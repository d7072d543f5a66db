"""Fine-tuning baselines: FT-L (ROME's constrained fine-tuning) and FT-M (EasyEdit's variant).

Both fine-tune the MLP output weight ``W_out`` of the chosen layers with Adam on the edit
requests and return the change as :class:`~fedit.deltas.WeightDeltas`; the model is restored
before returning.

- **FT-L** (``objective="prompt_last"``, ROME's baseline): the prompt alone is run and every
  target token's NLL is read at the prompt's last position; after each step the weights are
  clamped to an L∞ ball of radius ``norm_constraint`` around the originals.
- **FT-M** (``objective="target_new"``): teacher forcing on prompt + target with the loss on the
  target tokens only (the prompt is masked), no norm bound.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from fedit.core.tokens import validate_for_tokenizer
from fedit.deltas import WeightDeltas
from fedit.errors import HparamsError
from fedit.memory import hparams_dict
from fedit.methods import Method, register
from fedit.methods.base import EditOutcome, Resources
from fedit.methods.tail import Tail, target_rows
from fedit.requests import EditRequest

log = logging.getLogger(__name__)

OBJECTIVES = ("prompt_last", "target_new")


@dataclass
class FtHparams:
    layers: list[int]
    num_steps: int = 25
    lr: float = 5e-4
    weight_decay: float = 0.0
    # L∞ radius around the original weights (None: unbounded, FT-M)
    norm_constraint: float | None = 5e-5
    objective: str = "prompt_last"
    batch_size: int = 64  # requests per optimisation step (a batch larger than this is cycled through)
    nll_stop: float = 0.01  # stop once every request's mean target NLL is below this

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise HparamsError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}.",
                               "use prompt_last (FT-L) or target_new (FT-M).")
        if self.norm_constraint is not None and self.norm_constraint <= 0:
            raise HparamsError(f"norm_constraint must be positive or null, got {self.norm_constraint}.",
                               "give the L∞ radius (e.g. 5e-5) or null for no bound.")
        if self.num_steps < 1 or self.lr <= 0 or self.batch_size < 1:
            raise HparamsError("num_steps and batch_size must be at least 1 and lr positive.",
                               "e.g. num_steps 25, lr 5e-4, batch_size 64.")


@dataclass
class FtmHparams(FtHparams):
    """FT-M: the same fine-tuning, loss on the target tokens under teacher forcing, no bound."""

    norm_constraint: float | None = None
    objective: str = "target_new"


def compute_ftl(lm, requests: list[EditRequest], hp: FtHparams, resources: Resources) -> EditOutcome:
    """FT-L: fine-tune ``W_out`` of ``hp.layers``; returns the weight change, the model restored."""
    return fine_tune(lm, requests, hp, "ft-l")


def compute_ftm(lm, requests: list[EditRequest], hp: FtHparams, resources: Resources) -> EditOutcome:
    """FT-M: as :func:`compute_ftl` with FT-M's hyperparameters (teacher forcing, no bound)."""
    return fine_tune(lm, requests, hp, "ft-m")


def fine_tune(lm, requests: list[EditRequest], hp: FtHparams, method: str) -> EditOutcome:
    """Fine-tune ``W_out`` of ``hp.layers`` on the requests; returns the weight change, model restored."""
    t0 = time.perf_counter()
    validate_for_tokenizer(lm.tokenizer, requests, lm.model)
    ad = lm.adapter
    params = {ad.w_out_param_name(l): ad.w_out(l).weight for l in hp.layers}
    originals = {n: p.detach().clone() for n, p in params.items()}
    chunks = [requests[s:s + hp.batch_size] for s in range(0, len(requests), hp.batch_size)]
    tails = [Tail(lm, target_rows(lm.tokenizer, [r.filled_prompt for r in c], [r.target_new for r in c],
                                  hp.objective), min(hp.layers)) for c in chunks]
    opt = torch.optim.Adam(list(params.values()), lr=hp.lr, weight_decay=hp.weight_decay)
    history: list[float] = []
    try:
        for p in params.values():
            p.requires_grad_(True)
        for step in range(hp.num_steps):
            worst = 0.0
            for tail in tails:
                opt.zero_grad()
                nll = tail.nll()  # [n]
                nll.mean().backward()
                opt.step()
                worst = max(worst, float(nll.detach().max()))
                if hp.norm_constraint is not None:
                    with torch.no_grad():
                        for n, p in params.items():
                            o = originals[n]
                            p.copy_(torch.clamp(p, o - hp.norm_constraint, o + hp.norm_constraint))
            history.append(worst)
            if worst < hp.nll_stop:
                break
        with torch.no_grad():
            deltas = {n: (p.detach() - originals[n]).cpu() for n, p in params.items()}
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.requires_grad_(False)
                p.copy_(originals[n])
    log.info("%s: %d steps, worst target NLL %.3f -> %.3f", hp.objective, len(history), history[0], history[-1])
    wd = WeightDeltas(deltas=deltas, method=method,
                      model=lm.identity(), requests=[r.to_dict() for r in requests], hparams=hparams_dict(hp))
    return EditOutcome(deltas=wd, seconds=time.perf_counter() - t0,
                       diagnostics={"nll_history": history, "steps": len(history)})


register(Method("ft-l", FtHparams, compute_ftl, family="fine-tuning",
                description="fine-tune one MLP output weight on the target, update bounded in L∞ (ROME's FT-L)"))
register(Method("ft-m", FtmHparams, compute_ftm, family="fine-tuning",
                description="fine-tune one MLP output weight, loss on the target tokens only (EasyEdit's FT-M)"))
