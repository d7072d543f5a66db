"""What every editing method shares: its outcome type and the cached resources it needs."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from fedit.core.templates import generate_templates
from fedit.deltas import WeightDeltas
from fedit.paths import cache_root
from fedit.stats_cache import null_space_projectors, second_moments


@dataclass
class EditOutcome:
    """The deltas of an edit plus how it went (per-request target losses, timings)."""

    deltas: WeightDeltas
    targets: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    target_seconds: float = 0.0  # time spent optimising target vectors
    diagnostics: dict[str, Any] = field(default_factory=dict)
    # What a stateful method (AlphaEdit) carries to the next sequential batch, describing the
    # model with these deltas applied; None for the others.
    state: Any = None


@dataclass
class Resources:
    """Cached inputs of the editing core: context templates and second moments.

    The core functions take these as values; this object only decides where they are kept.
    """

    cache_dir: str | os.PathLike | None = None
    corpus: str | os.PathLike | None = None
    progress: bool = False
    template_seed: int = 0
    # folder of optimised target vectors (fedit.target_cache): None keeps nothing between calls
    target_cache: str | os.PathLike | None = None
    # second moments already read, by (model fingerprint, layer, samples, seq_len): federated
    # clients and sequential runs solve many times with the same statistics.
    _moments: dict = field(default_factory=dict, repr=False, compare=False)
    _targets: Any = field(default=None, repr=False, compare=False)

    def templates(self, lm, spec: list[list[int]]) -> list[list[str]]:
        """Context template groups for ``spec`` ([[length, n_gen], ...]), generated once per model."""
        ident = lm.identity()
        key = "_".join(f"{a}x{b}" for a, b in spec) + f"-seed{self.template_seed}"
        path = cache_root(self.cache_dir) / "templates" / ident["fingerprint"] / f"{key}.json"
        if path.exists():
            try:
                groups = json.loads(path.read_text())
                if isinstance(groups, list) and groups and groups[0] == ["{}"]:
                    return groups
            except json.JSONDecodeError:
                pass  # damaged cache: regenerate below
        groups = generate_templates(lm.model, lm.tokenizer, [tuple(s) for s in spec], seed=self.template_seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups, indent=1))
        os.replace(tmp, path)
        return groups

    def target_store(self):
        """The :class:`~fedit.target_cache.TargetCache` of ``target_cache``, or None."""
        if self.target_cache is None:
            return None
        if self._targets is None:
            from fedit.target_cache import TargetCache

            self._targets = TargetCache(self.target_cache)
        return self._targets

    def second_moments(self, lm, layers: list[int], samples: int, seq_len: int) -> dict[int, torch.Tensor]:
        fp = lm.identity()["fingerprint"]
        key = lambda l: (fp, str(self.corpus), l, samples, seq_len)  # noqa: E731
        missing = [l for l in layers if key(l) not in self._moments]
        if missing:
            got = second_moments(lm, missing, corpus=self.corpus, samples=samples, seq_len=seq_len,
                                 cache_dir=self.cache_dir, progress=self.progress)
            self._moments.update({key(l): got[l] for l in missing})
        return {l: self._moments[key(l)] for l in layers}

    def projectors(self, lm, layers: list[int], samples: int, seq_len: int, threshold: float) -> dict[int, torch.Tensor]:
        """AlphaEdit's null-space projectors, cached beside the statistics they come from."""
        return null_space_projectors(lm, layers, threshold, corpus=self.corpus, samples=samples, seq_len=seq_len,
                                     cache_dir=self.cache_dir, progress=self.progress)
