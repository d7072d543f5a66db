"""``fedit.load_hparams``: a method's hyperparameters with the method and the model attached,
what ``BaseEditor.from_hparams`` takes (EasyEdit's ``XHyperParams.from_hparams``)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from fedit.errors import HparamsError
from fedit.methods import Resources, get_method, hparams_for
from fedit.models.loading import DEFAULT_MODEL, LoadedModel, load_model, prepare


class EditorHparams:
    """A registered method, its hyperparameters (the method's dataclass) and the loaded model.

    Reading or setting a hyperparameter works as on EasyEdit's objects (``hp.layers``,
    ``hp.v_lr = 0.1``); a new value is validated by the method's dataclass at once.
    ``batch_size``: requests per edit in batch and sequential editing (None: all at once in
    batch editing, one at a time in sequential editing). ``resources``: where statistics and
    templates are cached and which corpus gives the second moments.
    """

    _OWN = ("alg_name", "hparams", "lm", "resources", "batch_size", "source")

    def __init__(self, alg_name: str, hparams: Any, lm: LoadedModel, resources: Resources | None = None,
                 batch_size: int | None = None, source: str = "") -> None:
        object.__setattr__(self, "alg_name", alg_name)
        object.__setattr__(self, "hparams", hparams)
        object.__setattr__(self, "lm", lm)
        object.__setattr__(self, "resources", resources or Resources())
        object.__setattr__(self, "batch_size", batch_size)
        object.__setattr__(self, "source", source)

    def _fields(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.hparams)]

    def __getattr__(self, name: str) -> Any:  # only for names that are not attributes
        hp = self.__dict__.get("hparams")
        if hp is not None and not name.startswith("_") and name in {f.name for f in dataclasses.fields(hp)}:
            return getattr(hp, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._OWN:
            object.__setattr__(self, name, value)
        elif name in self._fields():
            object.__setattr__(self, "hparams", dataclasses.replace(self.hparams, **{name: value}))
        else:
            raise HparamsError(f"{self.alg_name} has no hyperparameter {name!r}.", f"use one of {self._fields()}.")

    @property
    def model_name(self) -> str:
        return self.lm.name

    @property
    def device(self) -> str:
        return str(self.lm.device)

    def __repr__(self) -> str:
        return f"EditorHparams({self.alg_name!r}, model={self.model_name!r}, {self.hparams!r})"


def resolve_model(model: Any, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """A :class:`LoadedModel` from one, from a ``(model, tokenizer)`` pair (EasyEdit's way of
    passing a loaded model) or by name / folder (:func:`fedit.load_model`; None: the default)."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, tuple) and len(model) == 2:
        hf, tok = model
        return prepare(hf, tok, getattr(hf.config, "_name_or_path", "") or hf.config.model_type, device)
    if model is None or isinstance(model, (str, os.PathLike)):
        return load_model(str(model) if model is not None else DEFAULT_MODEL, device=device, dtype=dtype)
    raise HparamsError(f"model must be a LoadedModel, a (model, tokenizer) pair, a name or a folder, got "
                       f"{type(model).__name__}.", "e.g. model=\"gemma-3-270m\" or model=fedit.load_model().")


def is_yaml(source: str | os.PathLike) -> bool:
    """A YAML file's path rather than a method name."""
    from fedit.methods import METHODS

    return str(source).lower().endswith((".yaml", ".yml")) or (
        str(source).lower() not in METHODS and Path(source).is_file())


def load_hparams(source: str | os.PathLike, model: Any = None, device: str | None = None,
                 **overrides: Any) -> EditorHparams:
    """Hyperparameters for ``BaseEditor.from_hparams``.

    ``source``: a registered method name (``"rome"``, ``"memit"`` ...; fedit's tuned values for
    the model) or the path of an EasyEdit YAML file (its settings translated, unknown keys
    refused). ``model``: a :class:`LoadedModel`, a ``(model, tokenizer)`` pair, a built-in
    name such as ``"gemma-3-270m"`` or a local folder; for a YAML file it defaults to the file's
    ``model_name``, otherwise to fedit's default model. ``device`` wins over the file's.
    ``overrides`` set fields of the method's hyperparameters (and ``batch_size``) last.
    Loads the model when given by name; raises :class:`HparamsError` on bad values.
    """
    from fedit.editor.easyedit_yaml import read_file, translate

    batch_size = overrides.pop("batch_size", None)
    if is_yaml(source):
        f = read_file(source)
        lm = resolve_model(model if model is not None else f.model_name, device or f.device, f.dtype)
        method = get_method(f.method)
        values = translate(f, method.hparams_class, lm)
        resources = Resources(cache_dir=f.cache_dir, corpus=f.corpus)
        batch_size = batch_size if batch_size is not None else f.batch_size
        label = str(f.path)
    else:
        method = get_method(str(source))
        lm = resolve_model(model, device)
        values, resources, label = {}, None, method.name
    values.update(overrides)
    hp = hparams_for(method.name, lm, values)
    return EditorHparams(method.name, hp, lm, resources, batch_size, label)
