"""SERAC's edit artifact: an edit memory and a scope classifier that route the model's forward pass.

``SeracEdit`` holds the edits (requests), the trained classifier's weights, the
hyperparameters and the model identity. ``apply(model)`` attaches a router to the model's
body (the decoder stack that returns the final hidden states, found by the model adapter):

- a forward pre-hook reads each row's tokens (without padding), decodes them, and asks the
  classifier for the best stored edit; a row whose best P(in scope) > ``threshold`` is routed;
- a forward hook recomputes each routed row with the counterfactual model, the base model
  itself with the edit written in its context (``context`` template), and puts those final
  hidden states in place of the row's, so logits, teacher-forced probes and generation all
  answer through the router. Other rows are left exactly as the base model computed them.

In generation the prompt decides the scope: a decoding step's new tokens (with a key/value
cache) or a call on the same rows grown longer (without one) keeps the rows' routing, and
routed rows are recomputed in full.
Every edit applied to one model shares one router (a lifelong memory grows); ``revert``
removes the edit, and the last revert removes the hooks. Weights are never written.
"""

from __future__ import annotations

import inspect
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from fedit.core.tokens import encode
from fedit.deltas import check_float_tensors, meta_fields, read_edit_file, write_edit_file
from fedit.errors import DeltaFileError, FeditError
from fedit.methods.scope import ScopeClassifier, embed
from fedit.requests import EditRequest

FORMAT = "fedit-serac/1"
ROUTER = "_fedit_serac_router"
DEFAULT_CONTEXT = "{prompt} {target}.\n{prompt} {target}.\n"


@dataclass
class SeracEdit:
    """Edit memory + scope classifier; the duck-typed edit artifact (apply / save / load / revert)."""

    requests: list[dict[str, Any]]
    hparams: dict[str, Any]
    model: dict[str, Any]
    classifier: dict[str, torch.Tensor]
    method: str = "serac"
    tokenizer: Any = field(default=None, repr=False, compare=False)
    originals: dict = field(default_factory=dict, repr=False)  # no weights are touched

    def bind(self, tokenizer) -> "SeracEdit":
        """Attach the tokenizer of the model the edit will route (needed after :meth:`load`)."""
        self.tokenizer = tokenizer
        return self

    def with_originals(self, model: torch.nn.Module) -> "SeracEdit":
        """Nothing to record: SERAC changes no weights."""
        return self

    def apply(self, model: torch.nn.Module, check_base: bool = True) -> "SeracApplied":
        """Route ``model``'s forward pass through this edit memory until ``revert``."""
        if self.tokenizer is None:
            self.tokenizer = _tokenizer_of(model)
        router = model.__dict__.get(ROUTER)
        if router is None:
            router = Router(model, self.tokenizer)
            object.__setattr__(model, ROUTER, router)
        key = router.add(self)
        return SeracApplied(model=model, deltas=self, key=key)

    @contextmanager
    def applied(self, model: torch.nn.Module, check_base: bool = False) -> Iterator["SeracApplied"]:
        handle = self.apply(model, check_base=check_base)
        try:
            yield handle
        finally:
            handle.revert()

    def edit_requests(self) -> list[EditRequest]:
        return [EditRequest.from_dict(r) for r in self.requests]

    # --- files ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """safetensors: the classifier's tensors; metadata: requests, hparams, model identity."""
        path = Path(path)
        meta = {"format": FORMAT, "method": self.method, "model": json.dumps(self.model),
                "requests": json.dumps(self.requests), "hparams": json.dumps(self.hparams)}
        tensors = {f"classifier/{k}": v.detach().cpu().contiguous() for k, v in self.classifier.items()}
        return write_edit_file(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SeracEdit":
        path = Path(path)
        meta, tensors = read_edit_file(path, "use a file written by SeracEdit.save (fedit edit --method serac --save).")
        if meta.get("format") != FORMAT:
            raise DeltaFileError(f"{path} is not a SERAC edit file (format {meta.get('format')!r}).",
                                 "use a file written by SeracEdit.save.")
        m = meta_fields(path, meta, {"requests": list, "hparams": dict, "model": dict, "method": str})
        check_float_tensors(path, tensors)
        return cls(classifier={k[len("classifier/"):]: v for k, v in tensors.items()}, **m)

    def metadata(self) -> dict[str, Any]:
        return {"method": self.method, "model": self.model, "requests": self.requests, "hparams": self.hparams,
                "memory": len(self.requests), "encoder": self.hparams.get("encoder")}


@dataclass
class SeracApplied:
    """Handle of an applied SERAC edit; ``revert`` takes its edits out of the model's router."""

    model: torch.nn.Module
    deltas: SeracEdit
    key: int
    originals: dict = field(default_factory=dict)
    reverted: bool = False

    def revert(self) -> None:
        if self.reverted:
            return
        router = self.model.__dict__.get(ROUTER)
        if router is not None and router.remove(self.key):
            router.close()
            del self.model.__dict__[ROUTER]
        self.reverted = True


def _tokenizer_of(model):
    from transformers import AutoTokenizer

    name = getattr(model.config, "_name_or_path", "")
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as e:
        raise FeditError(f"the SERAC edit has no tokenizer and none can be found for {name!r} ({e}).",
                         "call edit.bind(lm.tokenizer) before applying a loaded SERAC edit.") from None


class _Memory:
    """One applied SeracEdit: its classifier, its edits' keys and contexts."""

    def __init__(self, edit: SeracEdit, tok):
        self.clf = ScopeClassifier()
        self.clf.load_state_dict(edit.classifier)
        self.clf.eval()
        reqs = edit.edit_requests()
        self.threshold = float(edit.hparams.get("threshold", 0.5))
        template = edit.hparams.get("context", DEFAULT_CONTEXT)
        with torch.no_grad():
            self.keys = self.clf.keys(embed([r.filled_prompt for r in reqs]))  # [E, d]
        self.contexts = [encode(tok, template.format(prompt=r.filled_prompt, target=r.target_new.strip()))
                         for r in reqs]


class Router:
    """The hooks on a model's body that send in-scope rows to the counterfactual model."""

    def __init__(self, model: torch.nn.Module, tok):
        from fedit.models.adapters import ModelAdapter

        self.body = ModelAdapter(model).body()
        self._signature = inspect.signature(self.body.forward)
        self.tok = tok
        self.memories: dict[int, _Memory] = {}
        self._next = 0
        self._inside = False
        self._rows: list[list[int]] = []  # every row's tokens so far (prefill + decoded)
        self._hits: list = []  # each row's routing, decided at the prefill
        self._pending: list[tuple[int, list[int], int, int]] = []  # (row, its real positions now, memory, edit)
        self.routed = 0  # rows sent to the counterfactual model (diagnostics)
        self._hooks = [self.body.register_forward_pre_hook(self._pre, with_kwargs=True),
                       self.body.register_forward_hook(self._post, with_kwargs=True)]

    def add(self, edit: SeracEdit) -> int:
        key = self._next
        self._next += 1
        self.memories[key] = _Memory(edit, self.tok)
        return key

    def remove(self, key: int) -> bool:
        """Forget one edit memory; True when none is left."""
        self.memories.pop(key, None)
        return not self.memories

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # --- routing --------------------------------------------------------------------------
    def route(self, texts: list[str]) -> list[tuple[int, int, float] | None]:
        """For each text: (memory key, edit index, P) of the best edit in scope, or None."""
        best: list[tuple[int, int, float] | None] = [None] * len(texts)
        if not texts or not self.memories:
            return best
        with torch.no_grad():
            x = embed(texts)
            for key, mem in self.memories.items():
                p = torch.sigmoid(mem.clf.logits(mem.clf.keys(x), mem.keys))  # [n, E]
                val, idx = p.max(-1)
                for i, (v, j) in enumerate(zip(val.tolist(), idx.tolist())):
                    if v > mem.threshold and (best[i] is None or v > best[i][2]):
                        best[i] = (key, j, v)
        return best

    def _pre(self, module, args, kwargs):
        if self._inside:
            return None
        given = self._signature.bind_partial(*args, **kwargs).arguments  # some bodies get them positionally
        ids = given.get("input_ids")
        self._pending = []
        if ids is None:  # embeddings given directly: nothing to read, the base model answers
            return None
        mask = given.get("attention_mask")
        if mask is None or mask.dim() != 2 or mask.shape != ids.shape:
            mask = torch.ones_like(ids)
        past = given.get("past_key_values", given.get("cache"))  # the name differs between architectures
        prefill = past is None or not hasattr(past, "get_seq_length") or past.get_seq_length() == 0
        now = [[int(p) for p in torch.nonzero(mask[r]).flatten()] for r in range(ids.shape[0])]
        new = [[int(ids[r, p]) for p in now[r]] for r in range(ids.shape[0])]
        if not prefill and len(self._rows) == ids.shape[0]:  # a cached decoding step: new tokens only
            self._rows = [a + b for a, b in zip(self._rows, new)]
        elif len(self._rows) == len(new) and all(len(b) > len(a) and b[:len(a)] == a for a, b in zip(self._rows, new)):
            self._rows = new  # generation without a cache: the same rows, longer
        else:
            self._rows = new
            self._hits = self.route([self.tok.decode(r, skip_special_tokens=True) for r in self._rows])
        for r, hit in enumerate(self._hits):
            if hit is not None and now[r]:
                self._pending.append((r, now[r], hit[0], hit[1]))
        return None

    def _post(self, module, args, kwargs, output):
        if self._inside or not self._pending:
            return None
        hidden = output.last_hidden_state
        if hidden.requires_grad:
            hidden = hidden.clone()
        self._inside = True
        try:
            with torch.no_grad():
                for r, pos, key, j in self._pending:
                    seq = self._counterfactual_input(self.memories[key].contexts[j], self._rows[r])
                    ids = torch.tensor([seq], device=hidden.device)
                    h = self.body(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
                    hidden[r, pos] = h[-len(pos):].to(hidden.dtype)
                    self.routed += 1
        finally:
            self._inside = False
            self._pending = []
        output.last_hidden_state = hidden
        return output

    def _counterfactual_input(self, context: list[int], row: list[int]) -> list[int]:
        """The edit's context, then the row (its own leading BOS dropped when the context has one)."""
        bos = getattr(self.tok, "bos_token_id", None)
        if bos is not None and row and context and row[0] == bos and context[0] == bos:
            row = row[1:]
        return context + row
