"""Hyperparameters: dataclasses validated on creation, values from JSON data files.

Files live in ``fedit/hparams/<method>/``: ``<model name>.json`` (e.g. ``gemma-3-270m.json``)
wins over ``<model_type>.json`` (e.g. ``gpt2.json``). ``"layers": "auto"`` picks layers by
depth for models without a tuned file. Overrides (``--layers``, ``--hparams FILE``) apply last.
"""

from __future__ import annotations

import dataclasses
import json
from importlib.resources import files
from pathlib import Path
from typing import Any, TypeVar

from fedit.errors import HparamsError

T = TypeVar("T")

PRECISIONS = ("float32", "bfloat16", "float16")


def autocast_for(target_precision: str) -> str | None:
    """``TargetConfig.autocast`` for a ``target_precision`` hyperparameter (None: plain float32).

    Raises :class:`HparamsError` for any other value."""
    if target_precision not in PRECISIONS:
        raise HparamsError(f"target_precision must be one of {PRECISIONS}, got {target_precision!r}.",
                           "use bfloat16 for speed on CPUs with AMX or on GPUs, float32 for exact runs.")
    return None if target_precision == "float32" else target_precision


def auto_layers(method: str, n_layers: int) -> list[int]:
    """Early-middle layers, where causal tracing finds factual recall in GPT-style models."""
    if method == "rome":
        return [max(0, n_layers // 3)]
    if method in ("mend", "ke"):  # meta-learned editors: the last three MLP layers (MEND's choice)
        return list(range(max(0, n_layers - 3), n_layers))
    lo, hi = max(0, n_layers // 6), max(1, n_layers // 3)
    return list(range(lo, max(hi, lo + 1) + 1)) if n_layers > 2 else [0]


def _candidates(model_name: str, model_type: str) -> list[str]:
    name = Path(model_name.rstrip("/")).name.lower()
    return [name, model_type]


def find_hparams_file(method: str, model_name: str, model_type: str) -> Path | None:
    root = files("fedit").joinpath("hparams", method)
    for cand in _candidates(model_name, model_type):
        p = root.joinpath(f"{cand}.json")
        if p.is_file():
            return Path(str(p))
    return None


def build(cls: type[T], values: dict[str, Any], source: str) -> T:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names - {"_comment", "_evidence"})
    if unknown:
        raise HparamsError(f"{source}: unknown hyperparameter(s) {unknown} for {cls.__name__}.",
                           f"use only {sorted(names)}.")
    return cls(**{k: v for k, v in values.items() if k in names})


def load_hparams(cls: type[T], method: str, model_name: str, model_type: str, n_layers: int,
                 overrides: dict[str, Any] | None = None, file: str | Path | None = None) -> T:
    """Hyperparameters for (method, model): data file, then ``file``, then ``overrides``."""
    values: dict[str, Any] = {}
    source = "defaults"
    found = find_hparams_file(method, model_name, model_type)
    if found is not None:
        values.update(json.loads(found.read_text()))
        source = str(found)
    if file is not None:
        try:
            values.update(json.loads(Path(file).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise HparamsError(f"cannot read hyperparameters from {file}: {e}.",
                               "give a JSON object of hyperparameters.") from e
        source = str(file)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if values.get("layers", "auto") == "auto":
        values["layers"] = auto_layers(method, n_layers)
    layers = values["layers"]
    if not isinstance(layers, list) or not layers or not all(isinstance(l, int) for l in layers):
        raise HparamsError(f"{source}: 'layers' must be a non-empty list of integers, got {layers!r}.",
                           "e.g. --layers 3,4,5")
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise HparamsError(f"layers {bad} do not exist in this model (layers 0..{n_layers - 1}).",
                           "pass --layers with layers inside that range.")
    values["layers"] = sorted(set(layers))
    return build(cls, values, source)
