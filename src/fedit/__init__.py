"""fedit: edit the factual knowledge of language models, alone or across organisations."""

from fedit.api import EditResult, edit, sequential_edit
from fedit.deltas import AppliedEdit, WeightDeltas, revert_file_edit
from fedit.editor import BaseEditor, EditorHparams, load_hparams, summary_metrics
from fedit.errors import FeditError, RequestError
from fedit.memory import MemoryEdit, load_edit
from fedit.methods import Resources, hparams_for
from fedit.models.loading import DEFAULT_MODEL, LoadedModel, load_model, prepare
from fedit.requests import EditRequest, load_requests

__version__ = "0.1.0"

__all__ = ["EditRequest", "EditResult", "AppliedEdit", "WeightDeltas", "FeditError", "RequestError", "Resources",
           "DEFAULT_MODEL", "LoadedModel", "edit", "sequential_edit", "hparams_for", "load_model", "load_requests",
           "prepare", "revert_file_edit", "__version__", "MemoryEdit", "load_edit",
           "BaseEditor", "EditorHparams", "load_hparams", "summary_metrics"]
