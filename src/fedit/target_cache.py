"""A disk cache of optimised target vectors (MEMIT's z, ROME's v*, PMET's pair).

Target optimisation is 90 % or more of an edit's time. The result for a request depends only
on the model's current weights, the :class:`~fedit.core.targets.TargetConfig`, the context
templates and the request itself, so it can be kept and reused:

- an interrupted ``fedit eval`` on 1,000 records resumes where it stopped (each batch of
  targets is written as soon as it is done);
- a sweep of λ or of the lower edited layers (same last layer) re-solves without
  re-optimising a single z.

The key covers the weights as they are now (:func:`weights_digest`, not just the base model's
fingerprint), so targets computed on an edited model, e.g. in a sequential run, are never
confused with the unedited model's. One file per target, written atomically; each entry carries
its key and a sha256 of its contents, so a damaged, swapped or renamed file is reported, ignored
and overwritten, and never stops a run or feeds a wrong target into an edit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, fields
from pathlib import Path

import torch

from fedit.atomic import replace_with
from fedit.core.targets import SPEED_SWITCHES
from fedit.errors import FeditError

log = logging.getLogger(__name__)

FORMAT = 2  # 2: entries carry their key and a checksum
_CHUNK = 1 << 22


def weights_digest(model: torch.nn.Module) -> str:
    """Fingerprint of the current weights: per tensor, its float64 sum and sum of squares.

    Reads every weight once (about 0.3 s for Gemma 3 270M on a CPU core) without a full-size
    copy. Values are rounded to 10 significant digits so that the order of a parallel
    reduction does not matter, while any real edit (ROME's rank-one update included) changes
    some sum of squares far beyond that.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            flat = p.detach().reshape(-1)
            s = sq = 0.0
            for c in range(0, flat.numel(), _CHUNK):
                part = flat[c:c + _CHUNK].double()
                s += float(part.sum())
                sq += float(part.dot(part))
            h.update(f"{name}:{tuple(p.shape)}:{s:.10g}:{sq:.10g};".encode())
    return h.hexdigest()[:32]


# A cached target serves a configuration that differs only in its speed switches.
SPEED_ONLY = (*SPEED_SWITCHES, "fused_loss")


def _config_key(cfg) -> dict:
    """The target configuration as the cache keys it: speed switches left out, and the
    candidate-vocabulary settings only when they are on (keys written before they existed stay)."""
    out = {k: v for k, v in asdict(cfg).items() if k not in SPEED_ONLY}
    if not out.get("vocab_subset"):
        out.pop("vocab_subset", None)
        out.pop("vocab_refresh", None)
    return out


class TargetCache:
    """Optimised targets under ``root`` (one ``.pt`` file per target), keyed as described above."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FeditError(f"cannot use {self.root} as the target cache: {e}.",
                             "pass a writable folder to --target-cache.") from e
        self.hits = 0
        self.misses = 0
        self._shapes: dict[str, dict[str, int | None]] = {}  # key -> the model's size of each target field


    def keys(self, lm, requests, templates: list[str], cfg) -> list[str]:
        base = json.dumps({"format": FORMAT, "model": lm.identity()["fingerprint"],
                           "weights": weights_digest(lm.model),
                           "config": _config_key(cfg),
                           "templates": list(templates)}, sort_keys=True)
        out = []
        shapes = _target_shapes(lm, cfg)
        for r in requests:
            item = json.dumps([r.prompt, r.subject, r.target_new])
            out.append(hashlib.sha256((base + item).encode()).hexdigest())
            self._shapes[out[-1]] = shapes
        return out

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.pt"

    def get(self, key: str):
        from fedit.core.targets import TargetResult

        path = self._path(key)
        if not path.exists():
            self.misses += 1
            return None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            if data.pop("key", None) != key:
                raise ValueError("the entry belongs to another key (swapped or renamed file)")
            if data.pop("checksum", None) != _checksum(data):
                raise ValueError("checksum mismatch (the contents were changed)")
            names = {f.name for f in fields(TargetResult)}
            result = TargetResult(**{k: v for k, v in data.items() if k in names})
            _check_shapes(result, self._shapes.get(key))
        except Exception as e:  # noqa: BLE001 - any damage means "not cached"
            log.warning("target cache: ignoring damaged %s (%s); it will be recomputed", path, e)
            self.misses += 1
            return None
        self.hits += 1
        result.seconds, result.from_cache = 0.0, True
        return result

    def put(self, key: str, result) -> None:
        path = self._path(key)
        data = {k: v for k, v in asdict(result).items() if k != "from_cache"}
        data = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in data.items()}
        data.update(checksum=_checksum(data), key=key)
        replace_with(path, lambda tmp: torch.save(data, tmp))


def _target_shapes(lm, cfg) -> dict[str, int | None]:
    """The size of each vector a target of ``cfg`` has on ``lm`` (None: the field must be absent)."""
    def size(site):
        return lm.adapter.w_out_dims(cfg.layer)[0] if site == "w_out" else lm.adapter.d_model

    joint = size(cfg.joint_site) if cfg.joint_site else None
    return {"z": size(cfg.site), "h": size(cfg.site), "joint_z": joint, "joint_h": joint}


def _check_shapes(result, shapes: dict[str, int | None] | None) -> None:
    """Raise ValueError unless every vector of a cached target is finite and, when the model's
    sizes are known (the key was made by :meth:`TargetCache.keys`), of the size the model needs:
    the key and checksum of an entry can be forged, its fit to the model cannot."""
    for name in ("z", "h", "joint_z", "joint_h"):
        v = getattr(result, name)
        want = (shapes or {}).get(name, "any")
        if v is None:
            if name in ("z", "h") or want not in (None, "any"):
                raise ValueError(f"{name} is missing")
            continue
        if not isinstance(v, torch.Tensor) or not v.is_floating_point() or not torch.isfinite(v).all():
            raise ValueError(f"{name} is not a finite float tensor")
        if want is None or (want != "any" and tuple(v.shape) != (want,)):
            raise ValueError(f"{name} has shape {tuple(v.shape)}; the model's site needs "
                             f"{'none' if want is None else (want,)}")


def _checksum(data: dict) -> str:
    """sha256 of an entry's fields: tensors by dtype, shape and bytes, other values as JSON."""
    h = hashlib.sha256()
    for k in sorted(data):
        v = data[k]
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous().reshape(-1)
            h.update(f"{k}:{t.dtype}:{tuple(v.shape)}:".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        else:
            h.update(f"{k}={json.dumps(v, sort_keys=True, default=str)};".encode())
    return h.hexdigest()
