"""A disk cache of the unedited model's measurements in ``fedit eval``.

Every evaluation measures its records on the unedited model first (``metrics_pre``, the
locality reference, fluency before the edit). For 1,000 CounterFact records that is about
28 000 teacher-forced probes plus the fluency generations: on two CPU cores about half an hour,
and the same half hour for every method, λ or layer set compared on the same records. The
result depends only on the weights, the probes, the generation settings and the software that
ran them, so it is kept under ``<cache>/measurements/`` and reused (a cache that cannot be
written only costs the next run its half hour).

The key covers the current weights (:func:`fedit.target_cache.weights_digest`, so an edited
model is never mistaken for the base), every probe's prompt and answer, the fluency prompts,
generation length and seed, the greedy continuations' length (generation_success), device type
and dtype, and the torch and fedit versions. One JSON file per key, written atomically; a
damaged file is reported, ignored and overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from fedit.evaluate.checkpoint import raw_from_json, raw_to_json

log = logging.getLogger(__name__)

FORMAT = 1


class PreCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def key(self, lm, probes: list[list[tuple[str, str, str, int]]], generation_prompts: list[str],
            gen_tokens: int, seed: int, greedy: list[int] | None = None) -> str:
        """The key of these measurements (``greedy``: the generation_success settings, None when
        they are not measured)."""
        from fedit import __version__
        from fedit.target_cache import weights_digest

        param = next(lm.model.parameters())
        doc = {"format": FORMAT, "model": lm.identity()["fingerprint"], "weights": weights_digest(lm.model),
               "device": lm.device.type, "dtype": str(param.dtype), "torch": torch.__version__,
               "fedit": __version__, "probes": probes, "generation": [generation_prompts, gen_tokens, seed]}
        if greedy is not None:
            doc["greedy"] = greedy
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, key: str, n: int) -> tuple[list[dict], dict[int, str]] | None:
        """The cached (raw measurements of ``n`` records, generations), or None."""
        path = self._path(key)
        if not path.exists():
            return None
        try:
            doc = json.loads(path.read_text())
            raw = raw_from_json(doc["raw"])
            gen = {int(k): str(v) for k, v in doc["gen"].items()}
            if len(raw) != n:
                raise ValueError(f"{len(raw)} records, expected {n}")
        except Exception as e:  # noqa: BLE001 - any damage means "not cached"
            log.warning("measurement cache: ignoring damaged %s (%s); it will be measured again", path, e)
            return None
        return raw, gen

    def put(self, key: str, raw: list[dict], gen: dict[int, str]) -> None:
        doc: dict[str, Any] = {"raw": raw_to_json(raw), "gen": {str(k): v for k, v in gen.items()}}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            path = self._path(key)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, path)
        except OSError as e:  # the run goes on: the cache only saves time
            log.warning("measurement cache: cannot write in %s (%s); the next run measures again", self.root, e)
