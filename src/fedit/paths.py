"""Where fedit keeps its caches (converted models, statistics, context templates)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$FEDIT_CACHE``, else ``~/.cache/fedit``."""
    if cache_dir is not None:
        root = Path(cache_dir)
    elif os.environ.get("FEDIT_CACHE"):
        root = Path(os.environ["FEDIT_CACHE"])
    else:
        root = Path.home() / ".cache" / "fedit"
    root.mkdir(parents=True, exist_ok=True)
    return root
