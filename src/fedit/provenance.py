"""What a result was made from: fedit's version, the model, the hyperparameters, the data file.

Every ``--json`` output and every ``report.json`` carries :func:`describe`'s dict under
``"provenance"``, so a number can be traced back to the exact inputs that produced it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_file(path: str | Path | None, kind: str | None = None) -> dict[str, Any] | None:
    """``{"kind", "path", "sha256", "shipped_sample"}`` of a dataset or request file.

    ``path=None`` with a dataset ``kind`` describes the sample shipped with fedit for that kind;
    with neither, returns None (no data file)."""
    shipped = path is None
    if shipped:
        if kind is None:
            return None
        from fedit.data.loaders import sample_path

        path = sample_path(kind)
    p = Path(path).expanduser()
    return {"kind": kind, "path": str(p), "sha256": sha256_file(p) if p.is_file() else None,
            "shipped_sample": shipped}


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def describe(lm=None, *, method: str | None = None, hparams: Any = None, sources: dict[str, str] | None = None,
             data: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """The provenance of a result, as a JSON-ready dict.

    ``lm``: the loaded model (its name, model type and weight fingerprint); ``hparams``: the
    resolved hyperparameters (a dataclass or a dict) and ``sources`` where each came from
    (:func:`fedit.methods.hparams.resolve_hparams`); ``data``: :func:`data_file`'s dict. Keys
    whose value is None are left out; ``extra`` keys are added as they are."""
    from fedit import __version__

    out: dict[str, Any] = {"fedit": __version__}
    if lm is not None:
        out["model"] = dict(lm.identity())
    if method is not None:
        out["method"] = method
    if hparams is not None:
        out["hparams"] = _jsonable(dataclasses.asdict(hparams) if dataclasses.is_dataclass(hparams) else hparams)
    if sources is not None:
        out["hparams_sources"] = dict(sources)
    if data is not None:
        out["data"] = data
    out.update({k: _jsonable(v) for k, v in extra.items() if v is not None})
    return out
