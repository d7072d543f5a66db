"""The target vectors z of a batch of requests, as the MEMIT family optimises them.

Shared by layer-by-layer MEMIT, PMET, AlphaEdit and the base-model form (``methods.vectors``),
so that none of those modules has to import another for it.
"""

from __future__ import annotations

import time

import torch

from fedit.core.targets import compute_targets as compute_targets_batched
from fedit.core.targets import target_summaries
from fedit.core.templates import flat
from fedit.requests import EditRequest


def compute_targets(lm, requests: list[EditRequest], hp, templates: list[str], cache=None):
    """The target of each request at the site ``hp.target_config()`` names (MEMIT, AlphaEdit:
    block L's output; PMET: W_out's output with the attention target beside it).

    ``hp``: hyperparameters with ``target_config()`` and ``v_batch_size`` (``MemitHparams`` and
    its subclasses). z for each request at the last edited layer's output (the MKVs of FLEKE)."""
    return compute_targets_batched(lm, requests, templates, hp.target_config(), batch_size=hp.v_batch_size,
                                   cache=cache, workers=hp.v_workers)


def targets_for(lm, requests: list[EditRequest], hp, groups: list[list[str]], cache=None):
    """Optimised z of ``requests`` with a report per request: (zs [n, d], reports, seconds).

    ``cache``: a target cache (``Resources.target_store()``) to take known targets from."""
    t0 = time.perf_counter()  # wall time: with v_workers > 1 the results' own seconds overlap
    results = compute_targets(lm, requests, hp, flat(groups), cache=cache)
    return torch.stack([r.z for r in results]), target_summaries(requests, results), time.perf_counter() - t0
