"""Optional features and the pip extras that install them.

``pip install fedit`` edits, evaluates and traces. Federation (Flower), CollabEdit on Flower,
the MiniLM partitioner, PEFT export and the web page need extras; code that imports one of
those packages calls :func:`require` first, so a missing extra is a :class:`FeditError` that
names the extra and the pip command instead of a bare ``ImportError``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from fedit.errors import FeditError

# extra -> what it is for (the packages themselves are listed in pyproject.toml)
EXTRAS: dict[str, str] = {
    "fed": "FedEdit federations on Flower (fedit fed run)",
    "collab": "CollabEdit on Flower's engine and SecAgg+ (fedit collab run --engine flower)",
    "partition": "clustering dataset records among clients with all-MiniLM-L6-v2",
    "minilm": "the all-MiniLM-L6-v2 sentence encoder (IKE's retrieval, SERAC's scope classifier, clustering)",
    "peft": "exporting edits as PEFT LoRA adapters (--format peft, fedit export --peft)",
    "ui": "the local web page (fedit ui)",
}


class MissingExtraError(FeditError):
    """An optional package is not installed; the message names the extra that brings it."""


def require(module: str, extra: str) -> ModuleType:
    """Import and return ``module``, or raise :class:`MissingExtraError` naming ``extra``.

    ``require("flwr", "fed")`` before ``from flwr... import ...`` in code that needs Flower.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        what = EXTRAS.get(extra, f"the {extra!r} feature")
        raise MissingExtraError(
            f"{what} needs the Python package {module.split('.')[0]!r}, which is not installed ({e}).",
            f"pip install 'fedit[{extra}]' (or 'fedit[all]' for every feature); from a source checkout: "
            f"pip install -e '.[{extra}]'.") from e
