"""Editing methods, registered by name. Each has a hyperparameter class and a compute function
``(lm, requests, hparams, resources) -> EditOutcome`` that leaves the model unchanged.

A ``stateful`` method (AlphaEdit) also takes ``state=`` (what the previous sequential batch
returned in ``EditOutcome.state``, or None) and returns the next state in its outcome."""

from __future__ import annotations

from dataclasses import dataclass
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
    name: str
    hparams_class: type
    compute: Callable[..., EditOutcome]
    stateful: bool = False  # takes state= and returns EditOutcome.state (sequential editing)

    def run(self, lm, requests, hparams, resources: Resources, zs=None, state=None) -> EditOutcome:
        """``compute`` with what this method takes: ``zs`` (precomputed targets) when given,
        ``state`` (the previous sequential batch's ``outcome.state``) when it is stateful."""
        kw: dict[str, Any] = {} if zs is None else {"zs": zs}
        if self.stateful:
            kw["state"] = state
        return self.compute(lm, requests, hparams, resources, **kw)


METHODS: dict[str, Method] = {
    "rome": Method("rome", RomeHparams, compute_rome),
    "memit": Method("memit", MemitHparams, compute_memit),
    "pmet": Method("pmet", PmetHparams, compute_pmet),
    "alphaedit": Method("alphaedit", AlphaEditHparams, compute_alphaedit, stateful=True),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise FeditError(f"unknown editing method {name!r}.", f"use one of {sorted(METHODS)}.") from None


def hparams_for(method: str, lm, overrides: dict[str, Any] | None = None, file: str | Path | None = None):
    """The hyperparameters ``method`` uses on ``lm`` (data file for the model, then overrides)."""
    m = get_method(method)
    return load_hparams(m.hparams_class, m.name, lm.name, lm.model_type, lm.adapter.n_layers, overrides, file)


__all__ = ["METHODS", "Method", "EditOutcome", "Resources", "get_method", "hparams_for",
           "RomeHparams", "MemitHparams", "PmetHparams", "AlphaEditHparams", "AlphaEditState", "compute_rome",
           "compute_memit", "compute_pmet", "compute_alphaedit"]
