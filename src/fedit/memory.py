"""Memory edits: edits that leave the base weights alone and act through hooks.

Memory-based and in-context methods (GRACE, WISE, IKE, SERAC) do not change parameters; they
store what they learned (a codebook, a side weight, demonstrations, a classifier) and change
what one module computes. A :class:`MemoryEdit` is that stored memory with the same
duck-typed interface as :class:`~fedit.deltas.WeightDeltas`:

    edit = outcome.deltas                 # a MemoryEdit or a WeightDeltas
    handle = edit.apply(lm.model)         # installs the memory's hooks
    handle.revert()                       # removes them: the model computes exactly as before
    with edit.applied(lm.model): ...      # temporary
    edit.save("e.safetensors"); load_edit("e.safetensors")   # either kind, by its format

How a memory acts is a *kind* registered with :func:`register_memory`: a function
``install(model, edit, active) -> [hook handles]`` that reads ``edit.tensors`` /
``edit.config`` and hooks the modules named in ``edit.sites`` (names the method took from the
model adapter). ``active()`` tells a hook whether its memory is the newest applied at its first
site: a memory edit *supersedes* earlier memory edits at the same site while it is applied
(a stateful method's artifact holds its whole memory so far, so stacking sequential batches
keeps only the newest memory live), and reverting it brings the earlier one back. Hooks must
pass the output through unchanged whenever ``active()`` is False.

A stateful memory method carries its memory between sequential batches in ``state``; the state
has ``memory_edit(lm) -> MemoryEdit`` so that a resumed sequential run can reinstall it.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from fedit.deltas import meta_fields, read_edit_file, write_edit_file
from fedit.errors import DeltaFileError

FORMAT = "fedit-memory/1"

# install(model, edit, active) -> list of removable hook handles
Installer = Callable[[nn.Module, "MemoryEdit", Callable[[], bool]], list]
_KINDS: dict[str, Installer] = {}
# The memories applied at each site module, oldest first (only the newest acts).
_APPLIED: "weakref.WeakKeyDictionary[nn.Module, list[object]]" = weakref.WeakKeyDictionary()


def register_memory(kind: str, install: Installer) -> None:
    """Declare how memories of ``kind`` act on a model (a method module calls this at import)."""
    if kind in _KINDS and _KINDS[kind] is not install:
        raise DeltaFileError(f"memory kind {kind!r} is registered twice.", "give the new memory another kind name.")
    _KINDS[kind] = install


def _installer(kind: str) -> Installer:
    if kind not in _KINDS:
        importlib.import_module("fedit.methods")  # method modules register their memory kinds
    if kind not in _KINDS:
        raise DeltaFileError(f"this edit holds a memory of kind {kind!r}, which this fedit does not know.",
                             f"use a fedit version that has it (known kinds: {sorted(_KINDS)}).")
    return _KINDS[kind]


def hparams_dict(hparams: Any) -> dict[str, Any]:
    """A method's hyperparameters (dataclass, dict or None) as a JSON-ready dict."""
    if hparams is None:
        return {}
    return json.loads(json.dumps(dataclasses.asdict(hparams) if dataclasses.is_dataclass(hparams) else dict(hparams),
                                 default=str))


@dataclass
class MemoryEdit:
    """A stored memory (tensors + JSON config) and the hooks that make a model use it."""

    kind: str  # which registered installer acts on the model
    sites: list[str]  # names of the hooked modules (from the model adapter); sites[0] is the slot
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]  # JSON-ready settings the installer reads (radius, thresholds, ...)
    method: str
    model: dict[str, Any]  # lm.identity() of the model the memory was built on
    requests: list[dict[str, Any]] = field(default_factory=list)
    hparams: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, lm, kind: str, sites: list[str], tensors: dict[str, torch.Tensor], config: dict[str, Any],
              method: str, requests: list | None = None, hparams: Any = None) -> "MemoryEdit":
        """A memory for ``lm`` (its identity recorded); requests are EditRequests or dicts."""
        reqs = [r if isinstance(r, dict) else r.to_dict() for r in (requests or [])]
        return cls(kind=kind, sites=list(sites), tensors={k: v.detach().cpu() for k, v in tensors.items()},
                   config=dict(config), method=method, model=lm.identity(), requests=reqs,
                   hparams=hparams_dict(hparams))

    # --- the WeightDeltas interface ----------------------------------------------------
    @property
    def originals(self) -> None:
        return None  # no weight is touched

    def with_originals(self, model: nn.Module) -> "MemoryEdit":
        """Nothing to record: a memory edit does not change weights."""
        return self

    def apply(self, model: nn.Module, check_base: bool = True, check_norm: bool = True) -> "AppliedMemory":
        """Install the memory's hooks on ``model``; the handle's ``revert`` removes them.

        Refuses a model that lacks the hooked modules (nothing is installed then). Base weights
        are never changed, so ``check_base`` only checks that the sites exist (``check_norm``,
        for the same call as :meth:`WeightDeltas.apply`, has no weight delta to bound).
        """
        install = _installer(self.kind)
        modules = []
        for name in self.sites:
            try:
                modules.append(model.get_submodule(name))
            except AttributeError:
                raise DeltaFileError(f"the model has no module {name!r} for this {self.method} memory.",
                                     f"apply it to a {self.model.get('model_type')} model like "
                                     f"{self.model.get('name')}.") from None
        token = object()
        slot = modules[0]
        _APPLIED.setdefault(slot, []).append(token)
        try:
            handles = install(model, self, lambda: _APPLIED.get(slot, [None])[-1] is token)
        except BaseException:
            _APPLIED[slot].remove(token)
            raise
        return AppliedMemory(model=model, deltas=self, handles=handles, slot=slot, token=token)

    @contextmanager
    def applied(self, model: nn.Module, check_base: bool = False) -> Iterator["AppliedMemory"]:
        """Apply for the duration of a ``with`` block; the hooks are removed however it ends."""
        handle = self.apply(model, check_base=check_base)
        try:
            yield handle
        finally:
            handle.revert()

    # --- files ------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        tensors = {f"mem/{k}": v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        meta = {"format": FORMAT, "kind": self.kind, "sites": json.dumps(self.sites),
                "config": json.dumps(self.config), "method": self.method, "model": json.dumps(self.model),
                "requests": json.dumps(self.requests), "hparams": json.dumps(self.hparams)}
        return write_edit_file(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MemoryEdit":
        meta, tensors = read_edit_file(path)
        if meta.get("format") != FORMAT:
            raise DeltaFileError(f"{path} is not a fedit memory edit (format {meta.get('format')!r}).",
                                 "open it with fedit.load_edit, which reads every kind of edit file.")
        m = meta_fields(path, meta, {"kind": str, "sites": list, "config": dict, "method": str, "model": dict,
                                     "requests": list, "hparams": dict})
        if not m["sites"] or not all(isinstance(x, str) for x in m["sites"]):
            raise DeltaFileError(f"{path} has damaged metadata ('sites' must name modules).", "recompute the edit.")
        return cls(tensors={k[len("mem/"):]: v for k, v in tensors.items() if k.startswith("mem/")}, **m)

    def metadata(self) -> dict[str, Any]:
        return {"method": self.method, "model": self.model, "requests": self.requests, "hparams": self.hparams,
                "memory": self.kind, "sites": self.sites,
                "tensors": {k: list(v.shape) for k, v in self.tensors.items()}}


@dataclass
class AppliedMemory:
    """Handle to an applied memory edit; ``revert`` removes its hooks (weights were never touched)."""

    model: nn.Module
    deltas: MemoryEdit
    handles: list
    slot: nn.Module
    token: object
    reverted: bool = False

    @property
    def originals(self) -> dict[str, torch.Tensor]:
        return {}  # no parameter was changed (the sequential runner asks which were)

    def revert(self) -> None:
        if self.reverted:
            return
        for h in self.handles:
            h.remove()
        stack = _APPLIED.get(self.slot, [])
        if self.token in stack:
            stack.remove(self.token)
        self.reverted = True


def edit_format(path: str | os.PathLike) -> str | None:
    """The ``format`` recorded in an edit file's metadata (None when it has none)."""
    path = Path(path)
    if not path.exists():
        raise DeltaFileError(f"edit file {path} does not exist.", "check the path.")
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("format")
    except (SafetensorError, OSError, ValueError) as e:
        raise DeltaFileError(f"{path} is not a readable safetensors file ({e}).",
                             "use a file written by `fedit edit --save`; recompute the edit if it was damaged.") from e


def load_edit(path: str | os.PathLike):
    """Open a saved edit of any kind: :class:`~fedit.deltas.WeightDeltas`, :class:`MemoryEdit` or a
    SERAC edit (:class:`~fedit.methods.serac_artifact.SeracEdit`)."""
    from fedit.deltas import FORMAT as DELTAS_FORMAT, WeightDeltas

    from fedit.methods.serac_artifact import FORMAT as SERAC_FORMAT, SeracEdit

    fmt = edit_format(path)
    if fmt == FORMAT:
        return MemoryEdit.load(path)
    if fmt == DELTAS_FORMAT:
        return WeightDeltas.load(path)
    if fmt == SERAC_FORMAT:
        return SeracEdit.load(path)
    raise DeltaFileError(f"{path} is not a fedit edit file (format {fmt!r}).", "use a file written by `fedit edit --save`.")


def is_memory(edit: Any) -> bool:
    return isinstance(edit, MemoryEdit)


# --- helpers for installers ---------------------------------------------------------------
def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear layer: ``nn.Linear`` or GPT-2's ``Conv1D`` (weight [d_in, d_out])."""
    if hasattr(module, "in_features"):
        return int(module.in_features), int(module.out_features)
    if hasattr(module, "nf"):
        return int(module.weight.shape[0]), int(module.nf)
    d_out, d_in = module.weight.shape
    return int(d_in), int(d_out)


def memory_tensor(edit: "MemoryEdit", name: str, shape: tuple[int | None, ...], floating: bool = True) -> torch.Tensor:
    """``edit.tensors[name]`` checked before any hook is installed: present, of ``shape`` (None:
    any size), real floating point and finite (``floating``) or integer; else a DeltaFileError
    (a damaged or hand-made memory file)."""
    t = edit.tensors.get(name)
    why = None
    if t is None:
        why = "is missing"
    elif t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        why = f"has shape {tuple(t.shape)}, the model needs {tuple('n' if d is None else d for d in shape)}"
    elif floating and not (t.is_floating_point() and bool(torch.isfinite(t).all())):
        why = f"is {t.dtype} or holds NaN/Inf, not finite real numbers"
    elif not floating and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        why = f"is {t.dtype}, not whole numbers"
    if why:
        raise DeltaFileError(f"the {edit.method} memory's tensor {name!r} {why}.",
                             f"recompute the edit, on a {edit.model.get('model_type')} model like {edit.model.get('name')}.")
    return t


def memory_number(edit: "MemoryEdit", key: str) -> float:
    """``edit.config[key]`` as a finite number, else a DeltaFileError."""
    v = edit.config.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise DeltaFileError(f"the {edit.method} memory's setting {key!r} is {v!r}, not a finite number.",
                             "recompute the edit.")
    return float(v)


def output_hook(module: nn.Module, active: Callable[[], bool],
                fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """Forward hook replacing ``module``'s output ``y`` by ``fn(x, y)`` (``x``: its first input)
    while the memory is active. Returns the removable handle."""

    def hook(mod, args, kwargs, out):
        if not active():
            return None
        x = args[0] if args else next(iter(kwargs.values()))
        return fn(x, out)

    return module.register_forward_hook(hook, with_kwargs=True)


# --- what a saved model cannot hold ------------------------------------------------------
def refuse_saving_memory(edit: Any, out: str | os.PathLike | None) -> None:
    """Refuse to write a model folder for a memory edit: its hooks are not weights, so the folder
    would hold the unedited model."""
    if out and is_memory(edit):
        raise DeltaFileError(f"a {edit.method} edit is a memory used through hooks; a saved model folder "
                             "cannot hold it (it would be the unedited model).",
                             "keep the edit file and apply it after loading the model (fedit.load_edit(...)"
                             ".apply(lm.model)), or leave out --out.")


def refuse_memory_revert(edit: Any) -> None:
    """A model loaded from disk never carries a memory edit, so there is nothing to revert."""
    if is_memory(edit):
        raise DeltaFileError(f"a {edit.method} edit is a memory used through hooks and is never written into a "
                             "model's weights, so a loaded model does not carry it.",
                             "nothing to revert: load the model without applying the edit (in Python, call "
                             "revert() on the handle that apply() returned).")
