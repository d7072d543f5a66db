"""``BaseEditor``: EasyEdit's editor interface over every method in fedit's registry.

    hp = fedit.load_hparams("rome", model="gemma-3-270m")      # or an EasyEdit YAML file
    editor = fedit.BaseEditor.from_hparams(hp)
    metrics, edited_model, weights_copy = editor.edit(
        prompts=["The Eiffel Tower is located in the city of"], subject=["Eiffel Tower"],
        target_new=["Rome"], ground_truth=["Paris"])

Edits go through :func:`fedit.edit` (the method's compute, then ``apply``); measurements through
:mod:`fedit.editor.quality`. The editor relies only on what every edit object offers:
``apply(model) -> handle`` with ``revert()``; weight edits (:class:`~fedit.WeightDeltas`) also
give the original tensors of what they touched.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from fedit.api import edit as compute_and_apply
from fedit.core.tokens import validate_for_tokenizer
from fedit.deltas import WeightDeltas
from fedit.editor.cases import Case, cases_from_dicts, cases_from_lists
from fedit.editor.hparams import EditorHparams, load_hparams
from fedit.editor.quality import fluency, measure, quality
from fedit.errors import FeditError, HparamsError
from fedit.methods import Resources, get_method

log = logging.getLogger(__name__)

EVAL_METRICS = ("token_em", "exact match")  # EasyEdit's names of teacher-forced token accuracy


def _refuse(kwargs: dict[str, Any], eval_metric: str) -> None:
    if kwargs:
        raise FeditError(f"BaseEditor.edit does not take {sorted(kwargs)}.",
                         "see docs/editor.md for the arguments fedit's editor takes (EasyEdit's pre_edit, pre_file "
                         "and train_ds have no counterpart).")
    if eval_metric not in EVAL_METRICS:
        raise FeditError(f"eval_metric {eval_metric!r} is not available.",
                         "leave it out: fedit measures token accuracy under teacher forcing ('token_em').")


class BaseEditor:
    """Edits a model with one method and reports EasyEdit's metrics before and after.

    Attributes as in EasyEdit: ``model`` (the torch module, edited in place), ``tok``,
    ``hparams``, ``alg_name``, ``model_name``; plus ``lm`` (fedit's :class:`LoadedModel`) and
    ``edits``: the edit objects of the last call, in the order applied (save them with
    ``.save(path)``; weight edits of a non-sequential call hold each batch's own change).
    """

    def __init__(self, hparams: EditorHparams, resources: Resources | None = None) -> None:
        if not isinstance(hparams, EditorHparams):
            raise HparamsError(f"BaseEditor needs fedit.load_hparams(...) or an EasyEdit YAML path, got "
                               f"{type(hparams).__name__}.",
                               "use BaseEditor.from_hparams(fedit.load_hparams('rome', model=...)).")
        self.hparams = hparams
        self.lm = hparams.lm
        self.model, self.tok = self.lm.model, self.lm.tokenizer
        self.alg_name, self.model_name = hparams.alg_name, self.lm.name
        self.method = get_method(hparams.alg_name)
        self.resources = resources or hparams.resources
        self.edits: list[Any] = []

    @classmethod
    def from_hparams(cls, hparams: EditorHparams | str | os.PathLike,
                     resources: Resources | None = None) -> "BaseEditor":
        """An editor for ``fedit.load_hparams(...)``'s result or an EasyEdit YAML file's path."""
        return cls(hparams if isinstance(hparams, EditorHparams) else load_hparams(hparams), resources)

    # --- EasyEdit's entry points ---------------------------------------------------------
    def edit(self, prompts: str | list[str] | None = None, target_new: str | list[str] | None = None,
             ground_truth: str | list[str] | None = None, rephrase_prompts: str | list | None = None,
             locality_inputs: dict | None = None, portability_inputs: dict | None = None,
             sequential_edit: bool = False, verbose: bool = True, *, subject: str | list[str] | None = None,
             keep_original_weight: bool = False, requests: list | None = None, test_generation: bool = False,
             eval_metric: str = "token_em", **kwargs: Any) -> tuple[list[dict], Any, Any]:
        """Edit and measure; returns ``(metrics, edited_model, weights_copy)``.

        ``metrics``: one dict per request, ``{"case_id", "requested_rewrite", "time", "pre",
        "post"}`` (:mod:`fedit.editor.quality`). ``sequential_edit``: requests are edited one
        after another (``batch_size`` at a time), stateful methods carrying their state, and
        measured once all are in. Otherwise each edit is measured on its own (batch methods take
        the requests as one batch, or ``batch_size`` at a time; one-fact methods such as ROME one
        by one, each from the unedited model), then all are applied together. The returned model
        carries the edits unless ``keep_original_weight``. ``weights_copy``: for weight edits,
        ``{parameter name: tensor before the edits}`` (copy them back to restore); for memory
        edits, the applied handle (a list if several), whose ``revert()`` removes it.
        ``requests``: request dicts (EasyEdit's or fedit's) instead of the lists.
        Inputs are validated before anything is edited; on an error the model is left unedited.
        """
        _refuse(kwargs, eval_metric)
        if requests is not None:
            cases = cases_from_dicts(requests)
        else:
            cases = cases_from_lists(prompts, target_new, subject, ground_truth, rephrase_prompts,
                                     locality_inputs, portability_inputs)
        return self.run(cases, sequential_edit, keep_original_weight, verbose, test_generation)

    def batch_edit(self, prompts: list[str], target_new: list[str], ground_truth: list[str] | None = None,
                   rephrase_prompts: list | None = None, locality_prompts: list | None = None,
                   locality_ground_truth: list | None = None, keep_original_weight: bool = False,
                   verbose: bool = True, *, subject: list[str] | None = None, test_generation: bool = False,
                   **kwargs: Any) -> tuple[list[dict], Any, Any]:
        """EasyEdit's ``batch_edit``: the requests as batches of ``batch_size`` (all at once when
        unset), each measured on its own; for batch methods only."""
        _refuse(kwargs, "token_em")
        if not self.batches:
            raise FeditError(f"{self.alg_name} edits one fact at a time and cannot batch-edit.",
                             "use edit() (each request on its own, or sequential_edit=True), or a batch method "
                             "such as memit.")
        loc = None
        if locality_prompts is not None:
            loc = {"neighborhood": {"prompt": locality_prompts, "ground_truth": locality_ground_truth}}
        cases = cases_from_lists(prompts, target_new, subject, ground_truth, rephrase_prompts, loc)
        return self.run(cases, False, keep_original_weight, verbose, test_generation)

    def edit_requests(self, requests: list, sequential_edit: bool = False, verbose: bool = True,
                      test_generation: bool = False, keep_original_weight: bool = False,
                      **kwargs: Any) -> tuple[list[dict], Any, Any]:
        """EasyEdit's ``edit_requests``: :meth:`edit` on request dicts."""
        eval_metric = kwargs.pop("eval_metric", "token_em")
        _refuse(kwargs, eval_metric)
        return self.run(cases_from_dicts(requests), sequential_edit, keep_original_weight, verbose, test_generation)

    # --- the loop ------------------------------------------------------------------------
    @property
    def batches(self) -> bool:
        """Whether the method edits several requests as one batch (MEMIT) rather than one fact
        per edit (ROME)."""
        return bool(getattr(self.method, "batch", True))

    def units(self, n: int, sequential: bool) -> list[list[int]]:
        """Indices of the requests edited together, in order."""
        size = self.hparams.batch_size
        if size is not None and size > 1 and not self.batches:
            raise HparamsError(f"{self.alg_name} edits one fact at a time; batch_size is {size}.",
                               "set batch_size to 1 or leave it out.")
        if size is None:
            size = n if self.batches and not sequential else 1
        return [list(range(i, min(i + size, n))) for i in range(0, n, size)]

    def run(self, cases: list[Case], sequential: bool = False, keep_original_weight: bool = False,
            verbose: bool = True, test_generation: bool = False) -> tuple[list[dict], Any, Any]:
        """:meth:`edit` on prepared cases."""
        lm, reqs = self.lm, [c.request for c in cases]
        validate_for_tokenizer(lm.tokenizer, reqs, lm.model)
        units = self.units(len(cases), sequential)
        raw_pre = measure(lm, cases)
        metrics = [{"case_id": i, "requested_rewrite": c.record(), "time": 0.0, "pre": quality(raw_pre[i])}
                   for i, c in enumerate(cases)]
        if test_generation:
            for m, c in zip(metrics, cases):
                m["pre"]["fluency"] = fluency(lm, [c.request.filled_prompt])
        edits: list[Any] = []
        live: list[Any] = []  # handles applied now, in order
        seen: list[Any] = []  # every handle, in order (the first to touch a parameter holds its original)
        state = None
        try:
            for u in units:
                t0 = time.perf_counter()
                res = compute_and_apply(lm, [reqs[i] for i in u], method=self.alg_name, hparams=self.hparams.hparams,
                                        resources=self.resources, state=state if sequential else None)
                for i in u:
                    metrics[i]["time"] = time.perf_counter() - t0
                edits.append(res.deltas)
                live.append(res.applied)
                seen.append(res.applied)
                if sequential:
                    state = res.outcome.state
                    continue
                self._post(metrics, cases, raw_pre, u, test_generation)
                if len(units) > 1:  # each batch measured alone: back to the unedited model
                    live.pop().revert()
            if sequential:
                self._post(metrics, cases, raw_pre, list(range(len(cases))), test_generation)
            elif len(units) > 1 and not keep_original_weight:
                for e in edits:  # computed on the unedited model each: their changes add up
                    weights = isinstance(e, WeightDeltas)
                    live.append(e.apply(lm.model, check_base=False) if weights else e.apply(lm.model))
        except BaseException:
            for h in reversed(live):
                h.revert()
            raise
        copy = weights_copy(edits, seen if all(isinstance(e, WeightDeltas) for e in edits) else live)
        if keep_original_weight:
            for h in reversed(live):
                h.revert()
        self.edits = edits
        if verbose:
            for m in metrics:
                rw = m["requested_rewrite"]
                log.info("%s editing: %s -> %s  pre %s post %s", m["case_id"], rw["prompt"], rw["target_new"],
                         m["pre"], m["post"])
        return metrics, lm.model, copy

    def _post(self, metrics: list[dict], cases: list[Case], raw_pre: list[dict], idx: list[int],
              test_generation: bool) -> None:
        raw = measure(self.lm, [cases[i] for i in idx])
        for j, i in enumerate(idx):
            metrics[i]["post"] = quality(raw[j], raw_pre[i])
            if test_generation:
                metrics[i]["post"]["fluency"] = fluency(self.lm, [cases[i].request.filled_prompt])


def weights_copy(edits: list[Any], handles: list[Any]) -> Any:
    """What ``edit`` returns to restore the model: for weight edits the tensors of every touched
    parameter before the first edit (``{name: tensor}``); for other edits their handles."""
    if all(isinstance(e, WeightDeltas) for e in edits):
        out: dict[str, Any] = {}
        for h in handles:
            for name, original in h.originals.items():
                out.setdefault(name, original)
        return out
    return handles[0] if len(handles) == 1 else list(handles)
