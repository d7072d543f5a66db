"""Trained editors on disk: ``DIR/editor.safetensors`` (weights + metadata) and ``DIR/editor.json``.

A trained editor (MEND's or KE's hypernetwork, SERAC's scope classifier) is made by
``fedit train`` and found again by path (``--editor DIR`` or the ``archive`` hyperparameter).
The metadata names the method, the model it was trained on (name, type, fingerprint), the
hyperparameters that shape the network, and how it was trained (data file, seed, steps).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fedit.errors import FeditError

FORMAT = "fedit-editor/1"
WEIGHTS = "editor.safetensors"
INFO = "editor.json"


class EditorError(FeditError):
    """A trained editor is missing, damaged, or was trained for another method or model."""


def save_editor(folder: str | os.PathLike, method: str, tensors: dict[str, torch.Tensor],
                info: dict[str, Any]) -> Path:
    """Write ``tensors`` and ``info`` (JSON-able: model, hparams, training) to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "method": method, "info": json.dumps(info)}
    tmp = folder / (WEIGHTS + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, folder / WEIGHTS)
    (folder / INFO).write_text(json.dumps({"method": method, **info}, indent=1))
    return folder


def load_editor(folder: str | os.PathLike | None, method: str, lm=None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, info) of the editor in ``folder``, checked to be ``method``'s and, with ``lm``,
    made for that model (same architecture and weights fingerprint). Raises :class:`EditorError`."""
    how = f"train one: fedit train --method {method} --dataset zsre --data zsre_mend_train-1k.json --out DIR"
    if folder is None:
        raise EditorError(f"{method} needs a trained editor and none was given.",
                          f"pass --editor DIR (or set 'archive' in the hyperparameters); {how}.")
    path = Path(folder).expanduser()
    path = path / WEIGHTS if path.is_dir() else path
    if not path.is_file():
        raise EditorError(f"no trained editor at {folder} (expected {WEIGHTS} there).",
                          f"give the --out folder of `fedit train`; {how}.")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        info = json.loads(meta.get("info", "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise EditorError(f"{path} is not a readable editor file ({e}).", f"retrain it; {how}.") from e
    if meta.get("format") != FORMAT or meta.get("method") != method:
        raise EditorError(f"{path} holds a {meta.get('method')!r} editor (format {meta.get('format')!r}), "
                          f"not a {method!r} one.", f"pass an editor trained with --method {method}; {how}.")
    if lm is not None:
        want, have = info.get("model", {}), lm.identity()
        if want.get("model_type") != have["model_type"] or want.get("fingerprint") != have["fingerprint"]:
            raise EditorError(f"the editor at {folder} was trained on {want.get('name')} "
                              f"(fingerprint {want.get('fingerprint')}), not on {have['name']} "
                              f"(fingerprint {have['fingerprint']}).",
                              f"use it with the model it was trained on, or {how} --model {have['name']}.")
    return tensors, info
