"""EasyEdit-compatible editing: ``BaseEditor``, ``load_hparams`` and EasyEdit's metrics
(see docs/editor.md)."""

from fedit.editor.base import BaseEditor
from fedit.editor.cases import Case, cases_from_dicts, cases_from_lists
from fedit.editor.hparams import EditorHparams, load_hparams
from fedit.editor.quality import summary_metrics

__all__ = ["BaseEditor", "Case", "EditorHparams", "cases_from_dicts", "cases_from_lists", "load_hparams",
           "summary_metrics"]
