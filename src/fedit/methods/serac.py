"""SERAC (Mitchell et al. 2022): edit memory + scope classifier + counterfactual model.

The edit writes nothing into the weights: it returns a :class:`~fedit.methods.serac_artifact.SeracEdit`
(the edits and the trained scope classifier). Applied, it routes every input whose best
P(in scope of a stored edit) exceeds ``threshold`` to the counterfactual model and leaves the
others to the base model, untouched. The counterfactual model is the base model itself with the
edit in its context (``context``, e.g. "The Eiffel Tower is located in Rome.\\n" before the
input): no second model to train or load, and it answers in the base model's own words; the
price is that a base model must copy a fact from its context, which small base models do
imperfectly on rephrasings. The classifier is trained by ``fedit train --method serac``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fedit.errors import HparamsError
from fedit.methods import EditOutcome, Method, register
from fedit.methods.meta.archive import load_editor
from fedit.methods.scope import ENCODER
from fedit.methods.serac_artifact import DEFAULT_CONTEXT, SeracEdit


@dataclass
class SeracHparams:
    """SERAC's routing and classifier-training settings."""

    layers: list[int] = field(default_factory=list)  # unused: SERAC edits no layer (the loader always sets it)
    archive: str | None = None  # folder of the trained scope classifier (``fedit train --method serac``)
    threshold: float = 0.5  # route when the best P(in scope) exceeds this
    context: str = DEFAULT_CONTEXT  # how the counterfactual model is told the edit ({prompt}, {target})
    encoder: str = ENCODER
    lr: float = 1e-3  # Adam step of the classifier
    batch_size: int = 32  # edits per step (their inputs are each other's negatives)
    hard_negatives: int = 3  # nearest other training edits added as negatives to each
    max_steps: int = 1000
    checkpoint_every: int = 100
    val_n: int = 50

    def __post_init__(self):
        if not 0.0 < float(self.threshold) < 1.0:
            raise HparamsError(f"SERAC threshold must lie in (0, 1), got {self.threshold!r}.", "use 0.5.")
        if "{prompt}" not in self.context or "{target}" not in self.context:
            raise HparamsError(f"SERAC context {self.context!r} must contain {{prompt}} and {{target}}.",
                               f"use e.g. {DEFAULT_CONTEXT!r}.")
        for name in ("batch_size", "max_steps", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise HparamsError(f"SERAC hyperparameter {name} must be a positive whole number.",
                                   f"set {name} to e.g. {SeracHparams.__dataclass_fields__[name].default}.")


def compute_serac(lm, requests, hparams: SeracHparams, resources=None) -> EditOutcome:
    """Store ``requests`` in a SERAC memory with the trained classifier of ``hparams.archive``."""
    t0 = time.perf_counter()
    tensors, info = load_editor(hparams.archive, "serac")
    hp = {**{k: v for k, v in vars(hparams).items()}, "trained_on": info.get("model", {}).get("name")}
    edit = SeracEdit(requests=[r.to_dict() for r in requests], hparams=hp, model=lm.identity(),
                     classifier=tensors, tokenizer=lm.tokenizer)
    return EditOutcome(deltas=edit, seconds=time.perf_counter() - t0,
                       diagnostics={"editor": str(hparams.archive), "memory": len(requests)})


register(Method("serac", SeracHparams, compute_serac, family="memory-based", needs_training=True,
                writes_weights=False, description="edit memory + trained scope classifier; in-scope inputs answered with the edit in context"))
