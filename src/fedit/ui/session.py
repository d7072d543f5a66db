"""The model a ``fedit ui`` server holds and the edits made on it.

Every method that touches the model runs on the job worker thread (:mod:`fedit.ui.jobs`), one
at a time; the ``check_*`` methods validate input on the request thread, before anything is
queued, so that bad input is refused at once with a :class:`FeditError`."""

from __future__ import annotations

import base64
import dataclasses
import importlib
import importlib.util
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fedit.deltas import WeightDeltas
from fedit.errors import FeditError
from fedit.methods import METHODS, Resources, get_method, hparams_for, names
from fedit.requests import EditRequest
from fedit.ui.measure import ProbeSet, measure

Progress = Callable[[str], None]


def peft_exporter() -> Callable | None:
    """``fedit.export.export_peft(deltas, out_dir)`` where this fedit has it and ``peft`` is
    installed (the ``[peft]`` extra), else None: the page then offers safetensors only."""
    if importlib.util.find_spec("peft") is None:
        return None
    try:
        mod = importlib.import_module("fedit.export")
    except ImportError:
        return None
    return getattr(mod, "export_peft", None)


@dataclass
class EditEntry:
    """One edit made on the page, applied until reverted."""

    id: int
    method: str
    probes: ProbeSet
    overrides: dict
    result: Any  # fedit.api.EditResult
    seconds: float
    before: list[dict]
    after: list[dict]
    reverted: list[dict] | None = None  # measurements after the revert

    def summary(self) -> dict:
        r = self.probes.request
        return {"id": self.id, "method": self.method, "request": r.to_dict(), "filled": r.filled_prompt,
                "overrides": self.overrides, "seconds": round(self.seconds, 2), "applied": self.reverted is None,
                "before": self.before, "after": self.after, "reverted": self.reverted,
                "downloadable": hasattr(self.result.deltas, "save"),
                "weight_edit": isinstance(self.result.deltas, WeightDeltas)}  # has a PEFT (LoRA) form


@dataclass
class Session:
    """One loaded model and the stack of edits applied to it (the newest is reverted first)."""

    lm: Any  # fedit.models.loading.LoadedModel
    defaults: dict = field(default_factory=dict)  # server-wide hyperparameter overrides (--set)
    hparams_file: str | None = None
    resources: Resources = field(default_factory=Resources)
    gen_tokens: int = 12
    edits: list[EditEntry] = field(default_factory=list)
    _noise: float | None = None

    # --- what the page shows -------------------------------------------------------------
    def info(self) -> dict:
        ident = self.lm.identity()
        return {"model": self.lm.name, "model_type": ident.get("model_type"), "fingerprint": ident.get("fingerprint"),
                "layers": self.lm.adapter.n_layers, "device": str(self.lm.device), "defaults": self.defaults,
                "methods": [{"name": n, "description": METHODS[n].description, "family": METHODS[n].family,
                             "needs_training": METHODS[n].needs_training} for n in names()],
                "peft": peft_exporter() is not None,
                "edits": [e.summary() for e in self.edits]}

    # --- validation, on the request thread --------------------------------------------------
    def check_fact(self, fact: dict) -> ProbeSet:
        """The probe set for a fact from the page; raises FeditError on bad input."""
        from fedit.core.tokens import validate_for_tokenizer

        if not isinstance(fact, dict):
            raise FeditError("the fact must be an object with prompt, subject and target_new.")
        target_true = (fact.get("target_true") or "").strip() or None
        req = EditRequest.build(str(fact.get("prompt") or "").strip(), str(fact.get("subject") or "").strip(),
                                str(fact.get("target_new") or "").strip(), target_true)
        validate_for_tokenizer(self.lm.tokenizer, [req], self.lm.model)
        return ProbeSet(req, _lines(fact.get("paraphrases")), _lines(fact.get("neighbours")))

    def overrides_for(self, method: str, page: dict | None) -> dict:
        """Server defaults that the method's hyperparameters have, then the page's overrides (all
        of which must be known). Raises FeditError for an unknown method or bad values."""
        m = get_method(method)
        if page is not None and not isinstance(page, dict):
            raise FeditError("hyperparameter overrides must be a JSON object.", 'write e.g. {"layers": [1]}.')
        known = {f.name for f in dataclasses.fields(m.hparams_class)}
        out = {k: v for k, v in self.defaults.items() if k in known}
        out.update(page or {})
        hparams_for(m.name, self.lm, out, self.hparams_file)  # validates now, before queuing
        return out

    # --- model work, on the worker thread ---------------------------------------------------
    def edit(self, probes: ProbeSet, method: str, overrides: dict, progress: Progress) -> dict:
        """Measure, edit (applied in place), measure again; returns the entry's summary."""
        from fedit.api import edit

        progress("measuring the unedited model")
        before = measure(self.lm, probes, self.gen_tokens)
        progress(f"computing the {method} edit")
        t0 = time.perf_counter()
        result = edit(self.lm, [probes.request], method=method, overrides=overrides, hparams_file=self.hparams_file,
                      resources=self.resources)
        seconds = time.perf_counter() - t0
        progress("measuring the edited model")
        after = measure(self.lm, probes, self.gen_tokens)
        entry = EditEntry(len(self.edits) + 1, method, probes, overrides, result, seconds, before, after)
        self.edits.append(entry)
        return entry.summary()

    def revert(self, progress: Progress) -> dict:
        """Revert the newest applied edit (bit-identical weights) and measure its prompts again."""
        live = [e for e in self.edits if e.reverted is None]
        if not live:
            raise FeditError("there is no applied edit to revert.", "edit a fact first.")
        entry = live[-1]
        progress(f"reverting edit {entry.id}")
        entry.result.applied.revert()
        progress("measuring the reverted model")
        entry.reverted = measure(self.lm, entry.probes, self.gen_tokens)
        return entry.summary()

    def save(self, edit_id: int, fmt: str, folder: Path) -> Path:
        """Write edit ``edit_id`` into ``folder``: ``edit-N.safetensors`` or a PEFT adapter folder."""
        entry = next((e for e in self.edits if e.id == edit_id), None)
        if entry is None:
            raise FeditError(f"there is no edit {edit_id}.", "download one of the edits listed on the page.")
        deltas = entry.result.deltas
        if not hasattr(deltas, "save"):
            raise FeditError(f"a {entry.method} edit is not a weight edit and cannot be saved as a file.",
                             "use a weight-editing method such as rome or memit.")
        if fmt == "safetensors":
            return deltas.save(folder / f"edit-{edit_id}-{entry.method}.safetensors")
        if fmt == "peft":
            export = peft_exporter()
            if export is None:
                raise FeditError("PEFT export is not available in this installation.",
                                 "pip install 'fedit[peft]', or download the safetensors file.")
            if not isinstance(deltas, WeightDeltas):
                raise FeditError(f"a {entry.method} edit does not change weights, so it has no LoRA form.",
                                 "download the safetensors file.")
            out = folder / f"edit-{edit_id}-{entry.method}-peft"
            export(deltas, out)
            return out
        raise FeditError(f"unknown download format {fmt!r}.", "use safetensors or peft.")

    def trace(self, prompt: str, subject: str, answer: str | None, kind: str, samples: int,
              progress: Progress) -> dict:
        """Causal trace of one prompt: the heat map as a PNG (base64) and its peak."""
        from fedit.locate import noise_level, recommend_layers, trace_prompt
        from fedit.locate.plot import draw

        if self._noise is None:
            progress("measuring the noise level (once per model)")
            self._noise = noise_level(self.lm, cache_dir=self.resources.cache_dir)
        progress(f"tracing {kind} states ({samples} noise samples)")
        maps = trace_prompt(self.lm, prompt, subject, answer, [kind], noise=self._noise, samples=samples)
        m = maps[kind]
        with tempfile.TemporaryDirectory() as tmp:
            png = draw([m], Path(tmp) / "trace.png", f"{self.lm.name}: {m.prompt!r} -> {m.answer.strip()!r}")
            data = base64.b64encode(png.read_bytes()).decode()
        out = {"png": data, "clean": m.high, "corrupted": m.low, "peak": m.peak(), "answer": m.answer}
        if kind == "mlp":
            out["recommendation"] = recommend_layers(m, len(hparams_for("memit", self.lm).layers))
        return out

    def check_trace(self, prompt: str, subject: str, kind: str, samples: int) -> None:
        from fedit.core.trace import KINDS, locate_subject

        if kind not in KINDS:
            raise FeditError(f"unknown trace kind {kind!r}.", f"use one of {list(KINDS)}.")
        if not isinstance(samples, int) or not 1 <= samples <= 100:
            raise FeditError(f"samples must be a whole number from 1 to 100, got {samples!r}.", "use e.g. 10.")
        if not prompt.strip() or not subject.strip():
            raise FeditError("give a prompt and a subject to trace.", 'e.g. "The {} is located in" and "Eiffel Tower".')
        locate_subject(prompt, subject)


def _lines(value) -> tuple[str, ...]:
    """Non-empty lines of a textarea (or items of a list)."""
    if value is None:
        return ()
    items = value.splitlines() if isinstance(value, str) else list(value)
    return tuple(s.strip() for s in map(str, items) if s.strip())
