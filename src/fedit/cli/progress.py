"""How the CLI shows progress: tqdm bars on stderr, none with ``--json`` or ``--quiet``."""

from __future__ import annotations

from contextlib import AbstractContextManager

from fedit import progress


def reporting_for(args) -> AbstractContextManager:
    """The reporter a command runs under (see :mod:`fedit.progress`)."""
    quiet = getattr(args, "json", False) or getattr(args, "quiet", False)
    return progress.reporting(None if quiet else progress.TqdmReporter())
