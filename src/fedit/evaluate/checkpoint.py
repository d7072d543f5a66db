"""Checkpoints of a sequential ``fedit eval`` run, so that a long run survives being stopped.

After every batch the runner writes, under ``OUT/checkpoint/``:

- ``weights.safetensors``: the current values of every parameter the run has touched so far
  (values, not deltas: a resumed run continues from exactly the same weights);
- ``state.pt``: a stateful method's state (AlphaEdit's keys of the edits so far), tensors only;
- ``progress.json``: batches done, the per-batch curve, timings, the unedited model's
  measurements, the run's signature (method, dataset records, batch size, model,
  hyperparameter overrides) and the resolved hyperparameters, which a resume must match.

Each file is written to a temporary name and renamed; ``progress.json`` last, so a checkpoint
is either the previous one or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedit.errors import FeditError
from fedit.methods import get_method

VERSION = 1


class CheckpointError(FeditError):
    pass


# Overrides that change how a run uses the machine, not its results: a run may resume with others.
NOT_SIGNED = ("v_workers",)


def signature(lm, records, cfg, overrides: dict | None, hparams_file) -> dict[str, Any]:
    ids = hashlib.sha256(json.dumps([[r.case_id, r.request.prompt, r.request.subject, r.request.target_new]
                                     for r in records], default=str).encode()).hexdigest()[:16]
    sig = {"version": VERSION, "model": lm.identity()["fingerprint"], "method": cfg.method, "dataset": cfg.dataset,
           "n": len(records), "records": ids, "batch_size": cfg.batch_size, "fluency_records": cfg.fluency_records,
           "track_batches": cfg.track_batches, "seed": cfg.seed,
           "overrides": {k: v for k, v in (overrides or {}).items() if v is not None and k not in NOT_SIGNED},
           "hparams_file": str(hparams_file) if hparams_file else None}
    if cfg.track_every != 1:  # only when set, so that checkpoints written before it still resume
        sig["track_every"] = cfg.track_every
    return sig


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _state_to_file(state) -> dict[str, Any] | None:
    if state is None:
        return None
    if not is_dataclass(state):
        raise CheckpointError(f"cannot checkpoint a method state of type {type(state).__name__}.",
                              "run without --sequential checkpoints or give the state a dataclass form.")
    out: dict[str, Any] = {"class": _class_path(type(state))}
    for f in fields(state):
        v = getattr(state, f.name)
        out[f.name] = {str(k): t.detach().cpu() for k, t in v.items()} if isinstance(v, dict) else v
    return out


def _state_from_file(data: dict[str, Any] | None, method: str):
    """The state saved by :func:`_state_to_file`, rebuilt as the class ``method`` registers."""
    if data is None:
        return None
    cls = get_method(method).state_class
    saved = data.pop("class")
    if cls is None or _class_path(cls) != saved:
        raise CheckpointError(f"the checkpoint holds a method state of {saved}; method {method!r} registers "
                              f"{'no state class' if cls is None else _class_path(cls)}.",
                              "resume with the version of fedit that wrote the checkpoint, or start again "
                              "in another --out folder.")
    kwargs = {}
    for f in fields(cls):
        v = data.get(f.name)
        kwargs[f.name] = {int(k): t for k, t in v.items()} if isinstance(v, dict) else v
    return cls(**kwargs)


def raw_to_json(raw: list[dict]) -> list[dict]:
    return [{g: {str(i): s for i, s in per.items()} for g, per in r.items()} for r in raw]


def raw_from_json(raw: list[dict]) -> list[dict]:
    return [{g: {int(i): s for i, s in per.items()} for g, per in r.items()} for r in raw]


class Checkpoint:
    def __init__(self, folder: str | os.PathLike, sig: dict[str, Any], hparams: dict[str, Any] | None = None):
        self.dir = Path(folder)
        self.sig = sig
        # the resolved hyperparameters: a data file edited between two sessions must not change
        # the second half of a run (checkpoints written before they were kept are not checked)
        self.hparams = hparams

    @property
    def progress_file(self) -> Path:
        return self.dir / "progress.json"

    def exists(self) -> bool:
        return self.progress_file.exists()

    def save(self, model: torch.nn.Module, names: set[str], state, progress: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        params = dict(model.named_parameters())
        weights = {n: params[n].detach().cpu().contiguous() for n in sorted(names)}
        _atomic(self.dir / "weights.safetensors", lambda p: save_file(weights, str(p)))
        _atomic(self.dir / "state.pt", lambda p: torch.save(_state_to_file(state), p))
        doc = {"signature": self.sig, "hparams": self.hparams, **progress, "raw_pre": raw_to_json(progress["raw_pre"]),
               "gen_pre": {str(k): v for k, v in progress["gen_pre"].items()}}
        _atomic(self.progress_file, lambda p: p.write_text(json.dumps(doc)))

    def _damaged(self, e: Exception) -> CheckpointError:
        return CheckpointError(f"the checkpoint in {self.dir} is damaged ({e}).",
                               f"delete {self.dir} to start the run again from the first batch.")

    def progress(self) -> dict[str, Any]:
        """The progress document alone (no weights, no signature check): for a look at a run."""
        try:
            doc = json.loads(self.progress_file.read_text())
            missing = [k for k in ("signature", "per_batch", "batches_done", "raw_pre", "gen_pre") if k not in doc]
            if missing:
                raise KeyError(f"no {', '.join(missing)}")
            doc["raw_pre"] = raw_from_json(doc["raw_pre"])
            doc["gen_pre"] = {int(k): v for k, v in doc["gen_pre"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise self._damaged(e) from e
        return doc

    def load(self) -> tuple[dict[str, torch.Tensor], Any, dict[str, Any]]:
        """(weights, state, progress) of the last completed batch; checks the signature."""
        doc = self.progress()
        try:
            weights = load_file(str(self.dir / "weights.safetensors"))
            saved_state = torch.load(self.dir / "state.pt", weights_only=True)
        except (OSError, ValueError, KeyError, SafetensorError, RuntimeError) as e:
            raise self._damaged(e) from e
        if doc.get("signature") != self.sig:
            diff = sorted(k for k in set(self.sig) | set(doc.get("signature") or {})
                          if (doc.get("signature") or {}).get(k) != self.sig.get(k))
            raise CheckpointError(f"the checkpoint in {self.dir} is of another run (differs in {diff}).",
                                  "resume with the same command, or use another --out folder.")
        stored = doc.get("hparams")
        diff = [] if stored is None or self.hparams is None else sorted(
            k for k in set(stored) | set(self.hparams) if k not in NOT_SIGNED and stored.get(k) != self.hparams.get(k))
        if diff:
            raise CheckpointError(f"the checkpoint in {self.dir} was edited with other hyperparameters "
                                  f"(differs in {diff}; was the data file changed since?).",
                                  "resume with the hyperparameters of the checkpoint (--hparams FILE with "
                                  "its values), or start again in another --out folder.")
        return weights, _state_from_file(saved_state, self.sig["method"]), doc
