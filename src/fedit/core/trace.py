"""Causal tracing: where in the network does the model recall a fact (docs/tracing.md)?

One clean run of the prompt; ``samples`` corrupted runs in which Gaussian noise is added to
the subject tokens at the output of the embedding module (what the blocks consume; Gemma
scales its embeddings inside that module); then, for every (token, layer), the clean value of
one state is put back into the corrupted runs and the probability of the answer token is
recorded. Three kinds of state: ``hidden`` (a block's output, the residual stream), and
windows of ``mlp`` or ``attn`` outputs (the module outputs that are added to the residual
stream, ``window`` consecutive layers centred on the layer, clipped at the model's ends).
Indirect effect = restored − corrupted probability.

Cost: restoring at layer l changes nothing below l, so each restoration re-runs only the
blocks from l (hidden) or from the window's first layer (mlp, attn) upwards, starting from
the corrupted run's cached state; many restorations go through one batched pass. Tokens
before the subject are clean in the corrupted run too (causal attention), so restoring them
cannot change anything: their scores are the corrupted probability, without a pass.
:func:`patched_prob` is the plain reference (full passes with hooks) the fast map is tested
against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from fedit.core.hooks import call_block, capture, edit_output, hooks, record_block_calls
from fedit.core.tokens import encode, span_tokens, target_ids
from fedit.errors import FeditError, RequestError

Kind = Literal["hidden", "mlp", "attn"]
KINDS: tuple[str, ...] = ("hidden", "mlp", "attn")

# Rows of an averaged map (ROME's grouping of token positions).
ROWS = ("first subject token", "middle subject tokens", "last subject token", "first subsequent token",
        "further tokens", "last token")


@dataclass
class TraceInput:
    """One prompt prepared for tracing: tokens, subject span, answer and the fixed noise."""

    ids: list[int]  # [T] with special tokens
    tokens: list[str]
    subject_range: tuple[int, int]  # token indices [lo, hi) of the subject
    answer_id: int
    answer: str
    noise: torch.Tensor  # [samples, hi - lo, d_model] added to the embedding output
    noise_level: float
    prompt: str  # the filled prompt
    subject: str


@dataclass
class TraceResult:
    """P(answer) with one state restored per (token, layer); ``scores`` is [T, n_layers]."""

    kind: str
    window: int
    scores: torch.Tensor
    low: float  # corrupted, nothing restored
    high: float  # clean
    tokens: list[str]
    subject_range: tuple[int, int]
    answer: str
    answer_id: int
    prompt: str
    subject: str
    samples: int
    noise_level: float

    @property
    def effect(self) -> torch.Tensor:
        """Indirect effect [T, n_layers]: restored − corrupted probability."""
        return self.scores - self.low

    def peak(self) -> dict:
        eff = self.effect
        flat = int(torch.argmax(eff))
        t, l = divmod(flat, eff.shape[1])
        return {"token": t, "token_text": self.tokens[t], "layer": l, "score": float(self.scores[t, l]),
                "effect": float(eff[t, l])}

    def to_dict(self) -> dict:
        return {"kind": self.kind, "window": self.window if self.kind != "hidden" else None,
                "prompt": self.prompt, "subject": self.subject, "answer": self.answer, "answer_id": self.answer_id,
                "tokens": self.tokens, "subject_range": list(self.subject_range), "samples": self.samples,
                "noise_level": self.noise_level, "clean": self.high, "corrupted": self.low,
                "scores": [[round(float(v), 6) for v in row] for row in self.scores], "peak": self.peak()}


@dataclass
class AverageTrace:
    """A map averaged over facts, tokens grouped into :data:`ROWS` ([len(ROWS), n_layers])."""

    kind: str
    window: int
    scores: torch.Tensor  # NaN where no fact has a token of that group
    low: float
    high: float
    n: int
    rows: tuple[str, ...] = ROWS
    counts: list[int] = field(default_factory=list)  # token rows pooled per group

    @property
    def effect(self) -> torch.Tensor:
        return self.scores - self.low

    def peak(self) -> dict:
        eff = torch.nan_to_num(self.effect, nan=-math.inf)
        flat = int(torch.argmax(eff))
        r, l = divmod(flat, eff.shape[1])
        return {"row": self.rows[r], "layer": l, "score": float(self.scores[r, l]), "effect": float(eff[r, l])}

    def to_dict(self) -> dict:
        return {"kind": self.kind, "window": self.window if self.kind != "hidden" else None, "n": self.n,
                "rows": list(self.rows), "counts": self.counts, "clean": self.high, "corrupted": self.low,
                "scores": [[None if math.isnan(float(v)) else round(float(v), 6) for v in row] for row in self.scores],
                "peak": self.peak()}


# --- preparation -------------------------------------------------------------------------

def locate_subject(prompt: str, subject: str) -> tuple[str, int, int]:
    """Fill ``prompt`` (with ``{}``, or spelling the subject out once) and return (text, start, end)."""
    if not subject or not subject.strip():
        raise RequestError("the subject is empty.", "give the subject as it appears in the prompt.")
    if "{}" in prompt:
        if prompt.count("{}") != 1:
            raise RequestError(f"the prompt {prompt!r} has more than one '{{}}'.", "mark the subject's place once.")
        start = prompt.index("{}")
        return prompt.replace("{}", subject, 1), start, start + len(subject)
    start = prompt.find(subject)
    if start < 0:
        raise RequestError(f"the subject {subject!r} does not occur in the prompt {prompt!r}.",
                           "spell the subject exactly as in the prompt, or mark its place with '{}'.")
    return prompt, start, start + len(subject)


@torch.no_grad()
def embedding_std(lm, subjects: list[str]) -> float:
    """Standard deviation of the embedding module's outputs over the tokens of ``subjects``.

    ROME's noise level is 3× this value. Special tokens are left out.
    """
    if not subjects:
        raise FeditError("no subjects to measure the embedding spread on.", "give at least one subject.")
    emb = lm.adapter.embed()
    vals = []
    for s in subjects:
        ids = encode(lm.tokenizer, s, special=False)
        if ids:
            vals.append(emb(torch.tensor([ids], device=lm.device))[0].float().reshape(-1))
    if not vals:
        raise FeditError("the subjects tokenise to nothing.", "give subjects made of ordinary text.")
    return float(torch.cat(vals).std())


@torch.no_grad()
def prepare(lm, prompt: str, subject: str, noise_level: float, answer: str | None = None, samples: int = 10,
            seed: int = 1) -> TraceInput:
    """Tokenise, find the subject's tokens, fix the answer token and draw the noise (seeded).

    ``answer=None`` scores the model's own greedy next token; otherwise the first token of
    ``answer`` (a leading space is added where missing, as for edit targets).
    """
    if samples < 1:
        raise FeditError(f"samples={samples}: tracing needs at least one corrupted run.", "use e.g. samples=10.")
    if not noise_level > 0:
        raise FeditError(f"noise level {noise_level} must be positive.", "use 3× the embedding spread (the default).")
    tok = lm.tokenizer
    text, start, end = locate_subject(prompt, subject)
    ids, lo, hi = span_tokens(tok, text, start, end)
    if answer is None:
        final = lm.adapter.body()(input_ids=torch.tensor([ids], device=lm.device)).last_hidden_state
        answer_id = int(lm.adapter.logits(final[0, -1]).argmax())
    else:
        a = target_ids(tok, answer)
        if not a:
            raise RequestError(f"the answer {answer!r} tokenises to nothing.", "give the answer as ordinary text.")
        answer_id = a[0]
    d = lm.adapter.d_model
    gen = torch.Generator().manual_seed(seed)
    noise = noise_level * torch.randn(samples, hi - lo, d, generator=gen)
    return TraceInput(ids=ids, tokens=[tok.decode([i]) for i in ids], subject_range=(lo, hi), answer_id=answer_id,
                      answer=tok.decode([answer_id]), noise=noise.to(lm.device), noise_level=float(noise_level),
                      prompt=text, subject=subject)


# --- module names of each kind --------------------------------------------------------------

def _state_name(ad, kind: str, layer: int) -> str:
    if kind == "hidden":
        return ad.block_name(layer)
    if kind == "mlp":
        return ad.mlp_out_name(layer)
    if kind == "attn":
        return ad.attn_out_name(layer)
    raise FeditError(f"unknown trace kind {kind!r}.", f"use one of {list(KINDS)}.")


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """Layers restored together for a windowed map at ``layer`` (ROME's centring, clipped)."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def _answer_prob(lm, final_last: torch.Tensor, answer_id: int) -> torch.Tensor:
    """P(answer) per row from final hidden states at the last position ([R, d] after the final norm)."""
    return F.softmax(lm.adapter.logits(final_last).float(), -1)[:, answer_id]


def _add_noise(inp: TraceInput, rows: int):
    lo, hi = inp.subject_range
    noise = inp.noise.repeat(rows // inp.noise.shape[0], 1, 1)

    def fn(out):
        out = out.clone()
        out[:, lo:hi] += noise.to(out.dtype)
        return out
    return fn


# --- the reference: full passes with hooks ---------------------------------------------------

@torch.no_grad()
def patched_prob(lm, inp: TraceInput, restore: list[tuple[int, int]], kind: str = "hidden",
                 corrupt: bool = True) -> float:
    """P(answer), averaged over the noise samples, with the clean value of each listed
    (token, layer) state of ``kind`` restored into the corrupted runs (no window: list the
    layers you want). ``restore=[]`` gives the corrupted probability; ``corrupt=False`` the
    clean one.
    """
    ad = lm.adapter
    ids = torch.tensor([inp.ids], device=lm.device)
    if not corrupt:
        return float(_answer_prob(lm, ad.body()(input_ids=ids).last_hidden_state[:, -1], inp.answer_id)[0])
    layers = sorted({l for _, l in restore})
    names = {l: _state_name(ad, kind, l) for l in layers}
    with capture({n: ad.module(n) for n in names.values()}) as clean:
        ad.body()(input_ids=ids)
    S = inp.noise.shape[0]
    batch = ids.repeat(S, 1)

    def restorer(name, toks):
        def hook(mod, args, out):
            first = out[0] if isinstance(out, tuple) else out
            first = first.clone()
            first[:, toks] = clean[name]["output"][:, toks].to(first.dtype)
            return (first,) + tuple(out[1:]) if isinstance(out, tuple) else first
        return hook

    by_layer = {l: sorted({t for t, ll in restore if ll == l}) for l in layers}
    with edit_output(ad.embed(), _add_noise(inp, S)), \
            hooks(lambda: [ad.module(names[l]).register_forward_hook(restorer(names[l], by_layer[l])) for l in layers]):
        final = ad.body()(input_ids=batch).last_hidden_state
    return float(_answer_prob(lm, final[:, -1], inp.answer_id).mean())


# --- the fast map -------------------------------------------------------------------------------

@torch.no_grad()
def trace_map(lm, inp: TraceInput, kind: str = "hidden", window: int = 10, max_rows: int = 128) -> TraceResult:
    """Scores [T, n_layers]: P(answer) with the clean state of ``kind`` restored at each
    (token, layer) (for ``mlp``/``attn``: at ``window`` layers around it). ``max_rows`` bounds
    the rows of one batched pass (restorations × noise samples).
    """
    if kind not in KINDS:
        raise FeditError(f"unknown trace kind {kind!r}.", f"use one of {list(KINDS)}.")
    if window < 1:
        raise FeditError(f"window={window} must be at least 1.", "use e.g. --window 10.")
    ad = lm.adapter
    blocks = list(ad.blocks())
    L, T = len(blocks), len(inp.ids)
    S = inp.noise.shape[0]
    ids = torch.tensor([inp.ids], device=lm.device)
    names = [_state_name(ad, kind, l) for l in range(L)]

    # Clean run: the states to restore, and each block's call arguments (batch 1; masks and
    # position embeddings broadcast over the larger batches below).
    with record_block_calls(blocks) as calls, capture({n: ad.module(n) for n in names}) as clean:
        final = ad.body()(input_ids=ids).last_hidden_state
    high = float(_answer_prob(lm, final[:, -1], inp.answer_id)[0])
    clean_states = [clean[n]["output"][0] for n in names]  # each [T, d]

    # Corrupted runs: every block's input and output.
    with edit_output(ad.embed(), _add_noise(inp, S)), \
            capture({str(l): b for l, b in enumerate(blocks)}, inputs=True) as cor:
        final = ad.body()(input_ids=ids.repeat(S, 1)).last_hidden_state
    low = float(_answer_prob(lm, final[:, -1], inp.answer_id).mean())

    lo_subj = inp.subject_range[0]
    scores = torch.full((T, L), low)
    tokens = list(range(lo_subj, T))
    per = max(1, max_rows // S)
    for l in range(L):
        first = l + 1 if kind == "hidden" else window_layers(l, window, L).start
        restored = [l] if kind == "hidden" else list(window_layers(l, window, L))
        for c in range(0, len(tokens), per):
            toks = tokens[c:c + per]
            n = len(toks)
            mask = torch.zeros(n * S, T, 1, dtype=torch.bool, device=lm.device)
            for j, t in enumerate(toks):
                mask[j * S:(j + 1) * S, t] = True
            if kind == "hidden":
                x = cor[str(l)]["output"].repeat(n, 1, 1)
                x = torch.where(mask, clean_states[l].to(x.dtype), x)
                fns = []
            else:
                x = cor[str(first)]["input"].repeat(n, 1, 1)
                fns = [(ad.module(names[k]), clean_states[k]) for k in restored]

            def make(state, mask=mask):
                def hook(mod, args, out):
                    first_out = out[0] if isinstance(out, tuple) else out
                    new = torch.where(mask, state.to(first_out.dtype), first_out)
                    return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new
                return hook

            with hooks(lambda fns=fns: [m.register_forward_hook(make(s)) for m, s in fns]):
                for j in range(first, L):
                    x = call_block(blocks[j], calls[j], x)
            p = _answer_prob(lm, ad.final_norm()(x[:, -1]), inp.answer_id)  # [n*S]
            scores[toks, l] = p.reshape(n, S).mean(1).cpu()
    return TraceResult(kind=kind, window=window, scores=scores, low=low, high=high, tokens=inp.tokens,
                       subject_range=inp.subject_range, answer=inp.answer, answer_id=inp.answer_id,
                       prompt=inp.prompt, subject=inp.subject, samples=S, noise_level=inp.noise_level)


# --- averaging and the recommendation -----------------------------------------------------------

def average_traces(results: list[TraceResult]) -> AverageTrace:
    """Average maps of one kind over facts, grouping token positions into :data:`ROWS`.

    Rows of several tokens (middle subject tokens, further tokens) are pooled token by token
    across facts, as ROME's averaged figures do. Tokens before the subject are left out.
    """
    if not results:
        raise FeditError("no traces to average.", "trace at least one fact.")
    kinds = {r.kind for r in results}
    if len(kinds) != 1:
        raise FeditError(f"cannot average traces of different kinds {sorted(kinds)}.", "average one kind at a time.")
    L = results[0].scores.shape[1]
    pools: list[list[torch.Tensor]] = [[] for _ in ROWS]
    for r in results:
        s = r.scores
        lo, hi = r.subject_range
        T = s.shape[0]
        pools[0].append(s[lo])
        pools[1].extend(s[t] for t in range(lo + 1, hi - 1))
        pools[2].append(s[hi - 1])
        if hi < T:
            pools[3].append(s[hi])
        pools[4].extend(s[t] for t in range(hi + 1, T - 1))
        if hi - 1 < T - 1:
            pools[5].append(s[T - 1])
    scores = torch.stack([torch.stack(p).mean(0) if p else torch.full((L,), float("nan")) for p in pools])
    return AverageTrace(kind=results[0].kind, window=results[0].window, scores=scores,
                        low=sum(r.low for r in results) / len(results),
                        high=sum(r.high for r in results) / len(results), n=len(results),
                        counts=[len(p) for p in pools])


def recommend_layers(mlp_map: AverageTrace | TraceResult, n_layers: int = 4) -> dict:
    """Edit layers from an (averaged) MLP map: where restoring MLP outputs at the subject's
    last token brings the answer back most.

    ``rome_layer`` is the layer of the largest indirect effect at the last subject token;
    ``memit_layers`` the ``n_layers`` consecutive layers with the largest summed effect there.
    With a windowed map each value already covers ``window`` layers around its layer.
    """
    if mlp_map.kind != "mlp":
        raise FeditError(f"layer recommendations come from an MLP map, got a {mlp_map.kind!r} map.",
                         "trace with --kind mlp.")
    if isinstance(mlp_map, AverageTrace):
        eff = mlp_map.effect[ROWS.index("last subject token")]
    else:
        eff = mlp_map.effect[mlp_map.subject_range[1] - 1]
    L = eff.shape[0]
    k = max(1, min(n_layers, L))
    sums = [float(eff[s:s + k].sum()) for s in range(L - k + 1)]
    best = max(range(len(sums)), key=sums.__getitem__)
    peak = int(torch.argmax(eff))
    return {"rome_layer": peak, "memit_layers": list(range(best, best + k)), "peak_effect": float(eff[peak]),
            "window_mean_effect": sums[best] / k, "basis": f"mlp map, window {mlp_map.window}, last subject token",
            "effect_by_layer": [round(float(v), 6) for v in eff]}
