"""Where fedit keeps its caches (converted models, statistics, context templates)."""

from __future__ import annotations

import os
from pathlib import Path

from fedit.errors import FeditError


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$FEDIT_CACHE``, else ``~/.cache/fedit``."""
    if cache_dir is not None:
        root = Path(cache_dir)
    elif os.environ.get("FEDIT_CACHE"):
        root = Path(os.environ["FEDIT_CACHE"])
    else:
        root = Path.home() / ".cache" / "fedit"
    root = root.expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FeditError(f"cannot use the cache folder {root}: {e.strerror or e}"
                         + (" (it is a file)" if root.exists() and not root.is_dir() else "") + ".",
                         "pass --cache-dir (or set FEDIT_CACHE) to a folder you can write to.") from e
    if not os.access(root, os.W_OK | os.X_OK):
        raise FeditError(f"the cache folder {root} is not writable.",
                         "pass --cache-dir (or set FEDIT_CACHE) to a folder you can write to.")
    return root
