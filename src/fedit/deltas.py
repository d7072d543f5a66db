"""Weight deltas: the one mechanism for applying, saving, loading and reverting edits.

Every method returns :class:`WeightDeltas` (parameter name -> additive update in the
parameter's stored layout). ``apply`` keeps the original tensors, so ``revert`` restores
bit-identical weights. A saved file (safetensors) carries the deltas, the original values of
the touched parameters (so that a later process can check the base and revert exactly), and
as metadata the requests, method, hyperparameters and model identity.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fedit.errors import DeltaFileError

FORMAT = "fedit-deltas/1"
READ_FIX = "use a file written by `fedit edit --save`; recompute the edit if it was damaged."


def write_edit_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    """Write an edit file (safetensors: ``tensors`` plus string ``meta`` and its creation time)
    atomically: a failed write leaves any earlier file as it was. Every kind of edit saves so."""
    from fedit.atomic import replace_with

    meta = {**meta, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return replace_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_edit_file(path: str | os.PathLike, fix: str = READ_FIX) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of an edit file; a missing or unreadable file is a DeltaFileError
    (``fix`` says what to do about a damaged one)."""
    path = Path(path)
    if not path.exists():
        raise DeltaFileError(f"edit file {path} does not exist.", "check the path.")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise DeltaFileError(f"{path} is not a readable safetensors file ({e}).", fix) from e
    return meta, tensors


def meta_fields(path: str | os.PathLike, meta: dict[str, str], fields: dict[str, type]) -> dict[str, Any]:
    """The edit file's metadata entries named in ``fields``, JSON-decoded where the type is not
    ``str``, each checked to be of its type; a missing, undecodable or mistyped one is a
    DeltaFileError (a damaged or hand-made file)."""
    out = {}
    for key, kind in fields.items():
        try:
            value = meta[key] if kind is str else json.loads(meta[key])
        except KeyError:
            raise DeltaFileError(f"{path} has damaged metadata (no {key!r}).", "recompute the edit.") from None
        except (ValueError, RecursionError) as e:  # not JSON, nested too deep, a number over the digit limit
            raise DeltaFileError(f"{path} has damaged metadata ({key!r}: {type(e).__name__}).",
                                 "recompute the edit.") from None
        if not isinstance(value, kind):
            raise DeltaFileError(f"{path} has damaged metadata ({key!r} is a {type(value).__name__}, not a "
                                 f"{kind.__name__}).", "recompute the edit.")
        out[key] = value
    return out


def check_float_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse tensors of an edit file that are not real floating-point numbers (a changed dtype)."""
    bad = [k for k, t in tensors.items() if not t.is_floating_point()]
    if bad:
        raise DeltaFileError(f"{path} holds tensor(s) {bad[:3]} of dtype {tensors[bad[0]].dtype}, not floating point.",
                             READ_FIX)


@dataclass
class WeightDeltas:
    """Additive updates for named parameters, plus what produced them."""

    deltas: dict[str, torch.Tensor]
    method: str
    model: dict[str, Any]
    requests: list[dict[str, Any]] = field(default_factory=list)
    hparams: dict[str, Any] = field(default_factory=dict)
    originals: dict[str, torch.Tensor] | None = None  # values before the edit, for exact revert

    @classmethod
    def from_layers(cls, lm, layers: dict[int, torch.Tensor], method: str, requests: list | None = None,
                    hparams: Any = None) -> "WeightDeltas":
        """Per-layer updates of W_out in math layout [d_out, d_in] as deltas of the stored parameters.

        ``lm`` is a loaded model (its adapter names and lays out the parameters); ``requests``
        are :class:`~fedit.requests.EditRequest` or dicts; ``hparams`` a dataclass or a dict.
        """
        ad = lm.adapter
        params = dict(lm.model.named_parameters())
        out = {}
        for l, d in layers.items():
            name = ad.w_out_param_name(l)
            out[name] = ad.to_param_layout(d).to(params[name].dtype).cpu()
        reqs = [r if isinstance(r, dict) else r.to_dict() for r in (requests or [])]
        if hparams is None:
            hp = {}
        elif dataclasses.is_dataclass(hparams):
            hp = dataclasses.asdict(hparams)
        else:
            hp = dict(hparams)
        return cls(deltas=out, method=method, model=lm.identity(), requests=reqs, hparams=hp)

    def apply(self, model: torch.nn.Module, check_base: bool = True, check_norm: bool = True) -> "AppliedEdit":
        """Add the deltas to ``model`` in place; the returned handle reverts bit-identically.

        With ``check_base`` and known originals, refuses a model whose weights are not the
        ones the edit was computed on; with ``check_norm``, a delta whose Frobenius norm is over
        :data:`MAX_RELATIVE_NORM` times its weight's (nothing is changed then). NaN/Inf and
        shapes that do not fit are always refused.
        """
        params = dict(model.named_parameters())
        missing = [n for n in self.deltas if n not in params]
        if missing:
            raise DeltaFileError(f"the model has no parameter(s) {missing}.",
                                 f"apply this edit to a {self.model.get('model_type')} model like {self.model.get('name')}.")
        for n, d in self.deltas.items():
            if tuple(d.shape) != tuple(params[n].shape):
                raise DeltaFileError(f"delta for {n} has shape {tuple(d.shape)}, the model's is {tuple(params[n].shape)}.",
                                     f"apply this edit to the model it was made for ({self.model.get('name')}).")
            if not torch.isfinite(d).all():
                raise DeltaFileError(f"delta for {n} holds NaN or Inf.", "recompute the edit; this one is unusable.")
            if check_norm:
                _check_norm(n, d, params[n])
        if check_base and self.originals is not None:
            wrong = [n for n in self.deltas if not torch.equal(params[n].detach().cpu(), self.originals[n].to(params[n].dtype))]
            if wrong:
                raise DeltaFileError(
                    f"the model's weights {wrong[:3]} differ from those this edit was computed on "
                    f"(base: {self.model.get('name')}, fingerprint {self.model.get('fingerprint')}).",
                    "apply it to that base model (or to the model as edited by the edits before it), "
                    "or pass check_base=False / --force to apply anyway.")
        originals = {n: params[n].detach().clone() for n in self.deltas}
        with torch.no_grad():
            for n, d in self.deltas.items():
                params[n].add_(d.to(device=params[n].device, dtype=params[n].dtype))
        return AppliedEdit(model=model, deltas=self, originals=originals)

    @contextmanager
    def applied(self, model: torch.nn.Module, check_base: bool = False) -> Iterator["AppliedEdit"]:
        """Apply for the duration of a ``with`` block; the weights are restored however it ends."""
        handle = self.apply(model, check_base=check_base)
        try:
            yield handle
        finally:
            handle.revert()

    def with_originals(self, model: torch.nn.Module) -> "WeightDeltas":
        """Record the model's current values of the touched parameters (call before applying)."""
        params = dict(model.named_parameters())
        self.originals = {n: params[n].detach().cpu().clone() for n in self.deltas}
        return self

    # --- files ------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        tensors = {f"delta/{n}": d.detach().cpu().contiguous() for n, d in self.deltas.items()}
        if self.originals is not None:
            tensors.update({f"orig/{n}": o.detach().cpu().contiguous() for n, o in self.originals.items()})
        meta = {"format": FORMAT, "method": self.method, "model": json.dumps(self.model),
                "requests": json.dumps(self.requests), "hparams": json.dumps(self.hparams)}
        return write_edit_file(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WeightDeltas":
        path = Path(path)
        meta, tensors = read_edit_file(path)
        if meta.get("format") != FORMAT:
            raise DeltaFileError(f"{path} is not a fedit edit file (format {meta.get('format')!r}).",
                                 "use a file written by `fedit edit --save`.")
        m = meta_fields(path, meta, {"method": str, "model": dict, "requests": list, "hparams": dict})
        check_float_tensors(path, tensors)
        deltas = {k[len("delta/"):]: v for k, v in tensors.items() if k.startswith("delta/")}
        originals = {k[len("orig/"):]: v for k, v in tensors.items() if k.startswith("orig/")} or None
        if not deltas:
            raise DeltaFileError(f"{path} holds no deltas.", READ_FIX)
        if originals is not None and ({n: tuple(t.shape) for n, t in originals.items()}
                                      != {n: tuple(t.shape) for n, t in deltas.items()}):
            raise DeltaFileError(f"{path}: its original weights do not match its deltas (names or shapes).", READ_FIX)
        return cls(deltas=deltas, method=m["method"], model=m["model"], requests=m["requests"],
                   hparams=m["hparams"], originals=originals)

    def metadata(self) -> dict[str, Any]:
        return {"method": self.method, "model": self.model, "requests": self.requests, "hparams": self.hparams,
                "parameters": {n: list(d.shape) for n, d in self.deltas.items()}}


@dataclass
class AppliedEdit:
    """Handle to an applied edit; ``revert`` puts back the exact original tensors.

    Also a context manager (``with deltas.apply(model):`` or ``ExitStack.enter_context``):
    leaving the block reverts, however it ends."""

    model: torch.nn.Module
    deltas: WeightDeltas | None  # None: weights set by value (:func:`assign_weights`)
    originals: dict[str, torch.Tensor]
    reverted: bool = False

    def revert(self) -> None:
        if self.reverted:
            return
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, o in self.originals.items():
                params[n].copy_(o)
        self.reverted = True

    def __enter__(self) -> "AppliedEdit":
        return self

    def __exit__(self, *exc) -> None:
        self.revert()


def assign_weights(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> AppliedEdit:
    """Set the named parameters of ``model`` to ``values`` exactly (e.g. a checkpoint's edited
    weights, which a delta added in float32 would not always reproduce bit for bit); the
    returned handle reverts bit-identically."""
    params = dict(model.named_parameters())
    wrong = [n for n, w in values.items() if n not in params or tuple(params[n].shape) != tuple(w.shape)]
    if wrong:  # checked before anything is written
        raise DeltaFileError(f"the model has no parameter(s) {wrong} of the saved shapes.",
                             "use the model these weights were saved from.")
    originals = {n: params[n].detach().clone() for n in values}
    with torch.no_grad():
        for n, w in values.items():
            params[n].copy_(w.to(device=params[n].device, dtype=params[n].dtype))
    return AppliedEdit(model=model, deltas=None, originals=originals)


# A delta larger than this many times its weight (Frobenius norms) is refused by default: real
# edits change a weight by a small fraction of it; a scaled or corrupt file breaks the model.
MAX_RELATIVE_NORM = 100.0


def _check_norm(name: str, delta: torch.Tensor, weight: torch.Tensor) -> None:
    dn, wn = float(delta.double().norm()), float(weight.detach().double().norm())
    if wn > 0 and dn > MAX_RELATIVE_NORM * wn:
        raise DeltaFileError(f"delta for {name} has norm {dn:.3g}, {dn / wn:.3g} times the weight's ({wn:.3g}); "
                             f"fedit refuses deltas over {MAX_RELATIVE_NORM:g} times, which break the model.",
                             "recompute the edit; if you are sure of this file, pass check_norm=False / --force.")


def revert_file_edit(model: torch.nn.Module, deltas: WeightDeltas, force: bool = False) -> None:
    """Undo a saved edit on a model that carries it, restoring the exact original weights.

    Checks that the model's weights are exactly base + delta (as ``apply`` produced them)
    unless ``force``; needs the originals stored in the file.
    """
    if deltas.originals is None:
        raise DeltaFileError("this edit file holds no original weights, so it cannot be reverted exactly.",
                             "save edits with originals (the default of `fedit edit --save`).")
    params = dict(model.named_parameters())
    for n, o in deltas.originals.items():  # even with force: never write these into a model
        if n not in params or tuple(o.shape) != tuple(params[n].shape):
            raise DeltaFileError(f"the file's original {n} does not fit the model "
                                 f"({tuple(o.shape)} vs {tuple(params[n].shape) if n in params else 'absent'}).",
                                 "revert on the model the edit was applied to.")
        if not torch.isfinite(o).all():
            raise DeltaFileError(f"the file's original {n} holds NaN or Inf; reverting would write it into the model.",
                                 "the file is damaged; reload the base model instead of reverting.")
    if not force:
        for n, d in deltas.deltas.items():
            if n not in params:
                raise DeltaFileError(f"the model has no parameter {n}.", "revert on the model the edit was applied to.")
            p = params[n]
            o = deltas.originals[n].to(device=p.device, dtype=p.dtype)
            expect = o + d.to(device=p.device, dtype=p.dtype)
            if not torch.equal(p.detach(), expect):
                raise DeltaFileError(f"the model's {n} is not the edited weight this file describes.",
                                     "revert on the model this edit was applied to (and after reverting any "
                                     "later edits), or pass --force.")
    with torch.no_grad():
        for n, o in deltas.originals.items():
            params[n].copy_(o.to(device=params[n].device, dtype=params[n].dtype))
