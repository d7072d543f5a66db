"""Editing methods, registered by name. Each has a hyperparameter class and a compute function
``(lm, requests, hparams, resources) -> EditOutcome`` that leaves the model unchanged.

A ``stateful`` method (AlphaEdit) also takes ``state=`` (what the previous sequential batch
returned in ``EditOutcome.state``, or None) and returns the next state in its outcome."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any, Callable

from fedit.errors import FeditError
from fedit.methods.alphaedit import AlphaEditHparams, AlphaEditState, compute_alphaedit
from fedit.methods.base import EditOutcome, Resources
from fedit.methods.hparams import load_hparams
from fedit.methods.memit import MemitHparams, compute_memit
from fedit.methods.pmet import PmetHparams, compute_pmet
from fedit.methods.rome import RomeHparams, compute_rome


@dataclass(frozen=True)
class Method:
    """A registered editing method and what it supports (everyone asks here, not by name)."""

    name: str
    hparams_class: type
    compute: Callable[..., EditOutcome]
    stateful: bool = False  # takes state= and returns EditOutcome.state (sequential editing)
    # a stateful method's state dataclass (tensors in dict fields): checkpoints rebuild it from here
    state_class: type | None = None
    family: str = "locate-then-edit"  # or "fine-tuning", "memory-based", "meta-learning", "in-context"
    # Its update is MEMIT's solve of per-fact vectors (z, keys, residuals): the vectors can be
    # shared instead of requests (FedEdit's private MKVs) and summed (CollabEdit).
    private_mkvs: bool = False
    takes_targets: bool = False  # accepts precomputed target vectors zs=
    # What a client shares per fact in FedEdit (fedit.federation): "mkv" (the target z, with keys
    # and residuals where private_mkvs), "codebook" (GRACE's key → value entries), "" (nothing:
    # the method cannot federate).
    federates: str = ""
    needs_training: bool = False  # needs a trained editor (``fedit train``) before it edits
    # Its edit is a change of weights (WeightDeltas): it can be written into a model folder or a
    # PEFT adapter. False for edits that act through hooks (memories, context).
    writes_weights: bool = True
    batch: bool = True  # edits several requests as one batch; False: one fact per edit (ROME), as EasyEdit does
    description: str = ""

    def run(self, lm, requests, hparams, resources: Resources, zs=None, state=None) -> EditOutcome:
        """``compute`` with what this method takes: ``zs`` (precomputed targets) when given,
        ``state`` (the previous sequential batch's ``outcome.state``) when it is stateful."""
        kw: dict[str, Any] = {} if zs is None else {"zs": zs}
        if zs is not None and not self.takes_targets:
            raise FeditError(f"method {self.name!r} does not take precomputed target vectors.",
                             f"use one of {names(takes_targets=True)} or leave the targets out.")
        if self.stateful:
            kw["state"] = state
        return self.compute(lm, requests, hparams, resources, **kw)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (a method module calls this once, at import)."""
    if method.name in METHODS and METHODS[method.name] != method:
        raise FeditError(f"editing method {method.name!r} is registered twice.", "give the new method another name.")
    METHODS[method.name] = method
    return method


def names(**capabilities: Any) -> list[str]:
    """Registered method names, optionally only those with the given capabilities
    (``names(private_mkvs=True)``, ``names(family="memory-based")``)."""
    return sorted(n for n, m in METHODS.items() if all(getattr(m, k) == v for k, v in capabilities.items()))


register(Method("rome", RomeHparams, compute_rome, batch=False,
                description="rank-one update of one MLP layer, one fact at a time"))
register(Method("memit", MemitHparams, compute_memit, private_mkvs=True, takes_targets=True, federates="mkv",
                description="many facts at once, spread over several MLP layers"))
register(Method("pmet", PmetHparams, compute_pmet, private_mkvs=True, takes_targets=True, federates="mkv",
                description="MEMIT with attention and MLP targets optimised together, MLP-only update"))
register(Method("alphaedit", AlphaEditHparams, compute_alphaedit, stateful=True, state_class=AlphaEditState,
                takes_targets=True, federates="mkv",
                description="MEMIT projected onto the null space of preserved keys (sequential editing)"))


def get_method(name: str) -> Method:
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise FeditError(f"unknown editing method {name!r}.", f"use one of {sorted(METHODS)}.") from None


def hparams_for(method: str, lm, overrides: dict[str, Any] | None = None, file: str | Path | None = None):
    """The hyperparameters ``method`` uses on ``lm`` (data file for the model, then overrides)."""
    m = get_method(method)
    return load_hparams(m.hparams_class, m.name, lm.name, lm.model_type, lm.adapter.n_layers, overrides, file)


__all__ = ["METHODS", "Method", "register", "names", "EditOutcome", "Resources", "get_method", "hparams_for",
           "RomeHparams", "MemitHparams", "PmetHparams", "AlphaEditHparams", "AlphaEditState", "compute_rome",
           "compute_memit", "compute_pmet", "compute_alphaedit"]

# Methods of the other families register themselves when their modules are imported.
import_module("fedit.methods.ft")
import_module("fedit.methods.grace")
import_module("fedit.methods.wise")
import_module("fedit.methods.ike")
import_module("fedit.methods.serac")
import_module("fedit.methods.meta.mend")
import_module("fedit.methods.meta.ke")
