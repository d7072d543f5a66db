"""Hyperparameters: dataclasses validated on creation, values from JSON data files.

Files live in ``fedit/hparams/<method>/``: ``<model_type>.json`` (e.g. ``gpt2.json``), then
``<model name>.json`` (e.g. ``gpt2-xl.json``) over it. ``"layers": "auto"`` picks layers by
depth for models without a tuned file. ``--hparams FILE``, flags such as ``--layers`` and
``--set KEY=VALUE`` apply last; :func:`resolve_hparams` says where every value came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from importlib.resources import files
from pathlib import Path
from typing import Any, TypeVar

from fedit.errors import HparamsError

T = TypeVar("T")

PRECISIONS = ("float32", "bfloat16", "float16")


def check_vocab_subset(vocab_subset: int, vocab_refresh: int) -> None:
    """Refuse a candidate vocabulary setting that cannot work (see ``fedit.core.lse``)."""
    if vocab_subset < 0 or vocab_refresh < 1:
        raise HparamsError(f"vocab_subset must be ≥ 0 and vocab_refresh ≥ 1, got {vocab_subset}, {vocab_refresh}.",
                           "use e.g. vocab_subset 1024, vocab_refresh 5 (0: off).")


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


def _method_dir(method: str):
    return files("fedit").joinpath("hparams", method)


def find_hparams_file(method: str, model_name: str, model_type: str) -> Path | None:
    """The most specific data file for (method, model): the model-name file, else the model-type file."""
    found = hparams_files(method, model_name, model_type)
    return found[-1][1] if found else None


def hparams_files(method: str, model_name: str, model_type: str) -> list[tuple[str, Path]]:
    """The data files that apply to (method, model), least specific first:
    ``[("model-type file", gpt2.json), ("model-name file", gpt2-xl.json)]`` where they exist."""
    root = _method_dir(method)
    name, mtype = _candidates(model_name, model_type)
    out = []
    for label, stem in (("model-type file", mtype), ("model-name file", name)):
        p = root.joinpath(f"{stem}.json")
        if p.is_file() and not (label == "model-name file" and stem == mtype):
            out.append((label, Path(str(p))))
    return out


def model_files(method: str) -> list[str]:
    """Names of the models (or model types) that ``method`` has a data file for."""
    root = _method_dir(method)
    if not root.is_dir():
        return []
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))


def build(cls: type[T], values: dict[str, Any], source: str) -> T:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names - {"_comment", "_evidence"})
    if unknown:
        raise HparamsError(f"{source}: unknown hyperparameter(s) {unknown} for {cls.__name__}.",
                           f"use only {sorted(names)}.")
    types_ = _field_types(cls)
    for k, v in values.items():
        if k not in names:
            continue
        if not _fits(v, types_[k]):
            name = str(types_[k]) if typing.get_origin(types_[k]) else getattr(types_[k], "__name__", str(types_[k]))
            raise HparamsError(f"{source}: {k} is {_short(v)}, not a {name}.", f"give {k} a {name} value.")
        if not _finite(v):
            raise HparamsError(f"{source}: {k} is {_short(v)}; hyperparameters must be finite numbers.",
                               f"give {k} a finite value.")
    return cls(**{k: v for k, v in values.items() if k in names})


def _finite(value: Any) -> bool:
    """No NaN or infinity anywhere in a JSON value."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fits(value: Any, typ: Any) -> bool:
    """Whether a JSON value fits a dataclass field type (int, float, bool, str, list[...], unions)."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, t) for t in typing.get_args(typ))
    if typ is type(None):
        return value is None
    if typ is bool:
        return isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is str:
        return isinstance(value, str)
    if origin is list:
        (inner,) = typing.get_args(typ) or (Any,)
        return isinstance(value, list) and all(_fits(v, inner) for v in value)
    return True  # Any or a type this check does not know


def parse_set(cls: type, text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` (from ``--set``) as ``(key, value)`` typed by ``cls``'s field.

    VALUE is read as JSON where it parses (``0.5``, ``[[5, 10]]``, ``true``), a comma-separated
    list for list fields (``layers=3,4,5``), else as text. Raises :class:`HparamsError` for an
    unknown key (naming close matches) or a value of the wrong type."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    types_ = _field_types(cls)
    if not sep or not key:
        raise HparamsError(f"--set {text!r} is not KEY=VALUE.", "write it like --set v_lr=0.2")
    if key not in {f.name for f in dataclasses.fields(cls)}:
        close = difflib.get_close_matches(key, list(types_), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise HparamsError(f"--set {key}: {cls.__name__} has no hyperparameter {key!r}.",
                           f"{hint}see `fedit hparams show METHOD` for the names.")
    typ = types_[key]
    raw = raw.strip()
    candidates: list[Any] = []
    try:
        candidates.append(json.loads(raw))
    except json.JSONDecodeError:
        pass
    if typing.get_origin(typ) is list or typ is list:
        try:
            candidates.append([json.loads(x) for x in raw.split(",") if x.strip()])
        except json.JSONDecodeError:
            pass
    if typ is bool and raw.lower() in ("yes", "no", "on", "off"):
        candidates.append(raw.lower() in ("yes", "on"))
    candidates.append(raw)
    for value in candidates:
        if _fits(value, typ):
            return key, float(value) if typ is float else value
    name = str(typ) if typing.get_origin(typ) else getattr(typ, "__name__", str(typ))
    raise HparamsError(f"--set {key}={raw}: {key} takes a {name}.", f"give {key} a {name} value.")


def parse_sets(cls: type, items: list[str] | None) -> dict[str, Any]:
    """Every ``--set KEY=VALUE`` as a dict (a later key wins)."""
    return dict(parse_set(cls, t) for t in items or [])


def _read_file(file: str | Path) -> dict[str, Any]:
    try:
        values = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # also: not UTF-8, not JSON, too deep, too many digits
        raise HparamsError(f"cannot read hyperparameters from {file}: {str(e)[:200]}.",
                           "give a JSON object of hyperparameters.") from e
    if not isinstance(values, dict):
        raise HparamsError(f"{file} holds a JSON {type(values).__name__}, not an object.",
                           'give a JSON object of hyperparameters, e.g. {"layers": [4]}.')
    return values


def resolve_hparams(cls: type[T], method: str, model_name: str, model_type: str, n_layers: int,
                    overrides: dict[str, Any] | None = None, file: str | Path | None = None,
                    sets: dict[str, Any] | None = None) -> tuple[T, dict[str, str]]:
    """Hyperparameters for (method, model) and where each value came from.

    Layers, later wins: the dataclass default, the model-type file, the model-name file,
    ``file`` (``--hparams``), ``overrides`` (flags such as ``--layers``; None values are not
    given) and ``sets`` (``--set``). Returns ``(hparams, {field: source})``, source one of
    ``"default"``, ``"model-type file <method>/<file>"``, ``"model-name file <method>/<file>"``,
    ``"--hparams <path>"``, ``"override"``, ``"--set"``, ``"auto (by depth)"``."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {f.name: "default" for f in dataclasses.fields(cls)}
    source = "defaults"

    def layer(new: dict[str, Any], label: str) -> None:
        for k, v in new.items():
            values[k] = v
            if not k.startswith("_"):
                sources[k] = label

    for label, path in hparams_files(method, model_name, model_type):
        layer(json.loads(path.read_text()), f"{label} {method}/{path.name}")
        source = str(path)
    if file is not None:
        layer(_read_file(file), f"--hparams {file}")
        source = str(file)
    layer({k: v for k, v in (overrides or {}).items() if v is not None}, "override")
    layer(dict(sets or {}), "--set")
    if values.get("layers", "auto") == "auto":
        values["layers"] = auto_layers(method, n_layers)
        sources["layers"] = "auto (by depth)"
    layers = values["layers"]
    if not isinstance(layers, list) or not layers or not all(isinstance(l, int) for l in layers):
        raise HparamsError(f"{source}: 'layers' must be a non-empty list of integers, got {layers!r}.",
                           "e.g. --layers 3,4,5")
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise HparamsError(f"layers {bad} do not exist in this model (layers 0..{n_layers - 1}).",
                           "pass --layers with layers inside that range.")
    values["layers"] = sorted(set(layers))
    hp = build(cls, values, source)
    return hp, {f.name: sources[f.name] for f in dataclasses.fields(cls)}


def load_hparams(cls: type[T], method: str, model_name: str, model_type: str, n_layers: int,
                 overrides: dict[str, Any] | None = None, file: str | Path | None = None) -> T:
    """Hyperparameters for (method, model): data files, then ``file``, then ``overrides``."""
    return resolve_hparams(cls, method, model_name, model_type, n_layers, overrides, file)[0]
