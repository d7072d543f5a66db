"""Target-vector optimisation: the z of MEMIT, the v* of ROME (FLEKE's "MKV"), PMET's pair.

A vector δ is added at the subject's last token at one site (the output of W_out for ROME, the
output of a block for MEMIT) and optimised so that every rewriting prompt continues with the
new target, while the model's distribution on "{subject} is a" stays put (KL term) and δ stays
small (weight decay, norm clamp). The result is z = h + δ. With a ``joint_site`` (PMET: W_out
and the attention output of the same layer) a second δ is optimised together with the first,
each with its own weight decay and clamp.

Cost: only δ requires grad, so no weight gradients are formed and autograd only records the
blocks above the site. After the first step, the blocks below the site are not run again:
their output is cached and the upper blocks are re-run with the arguments each got the first
time (``hooks.record_block_calls``). Logits are formed only at target and KL positions. With ``drop_stopped`` a request whose loss
reached ``nll_stop`` leaves the batch: its rows are no longer run, so a batch costs what its
live requests cost rather than running at full size until the slowest one is done (each δ is
the same either way; ``drop_stopped=False`` restores the full-batch loop).
With ``autocast`` ("bfloat16"/"float16") the forward and backward passes run under
``torch.autocast`` while δ, h and the optimiser stay in float32: on CPUs with bfloat16 matrix
units (AMX) this is about 1.4x faster for MEMIT's targets on Gemma 3 270M, and z agrees with the
float32 one to about 1 % (docs/benchmarks.md).

With ``vocab_subset`` the steps between exact ones read only a candidate vocabulary (see
:class:`_Candidates`): a quality lever, z moves slightly. ``math_attention`` runs the loop's
attention on PyTorch's math kernel on CPU, whose flash-attention backward is slow at these shapes.

A ``cache`` (any object with ``keys``/``get``/``put``, e.g. :class:`fedit.target_cache.TargetCache`)
returns results already optimised for the same model weights, configuration, templates and
request, and receives each new batch as soon as it is done, so an interrupted run resumes.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from fedit import progress
from fedit.core import lse, prefix
from fedit.core import workers as workers_mod
from fedit.core.hooks import call_block, capture, edit_output, record_block_calls
from fedit.core.tokens import last_token_of_span, pad, pad_id, subject_batch, target_ids
from fedit.requests import EditRequest

log = logging.getLogger(__name__)

Site = Literal["w_out", "block", "attn"]


# Switches that change how fast targets are found, not which: z is the same to float noise with
# them on or off (tests/test_targets_speed.py). All off is the path before them ("today's path"
# of benchmarks/bench_targets.py and bench_speed.py).
SPEED_SWITCHES = ("drop_stopped", "reuse_prefix", "one_projection", "cast_once", "math_attention")


def speed_switches(on: bool) -> dict[str, bool]:
    """``TargetConfig`` keyword arguments turning every speed switch on (the default) or off."""
    return {k: on for k in SPEED_SWITCHES}


@dataclass(frozen=True)
class TargetConfig:
    layer: int
    site: Site
    steps: int = 25
    lr: float = 0.5
    clamp: float = 4.0  # ‖δ‖ ≤ clamp · ‖h‖
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    nll_stop: float = 0.05
    kl_prompt: str = "{} is a"
    reuse_lower: bool = True  # cache the blocks below the site after the first step
    joint_site: Site | None = None  # a second site of the same layer optimised together (PMET)
    decay_power: float = 2  # weight decay ‖δ‖/‖h‖^p: 2 in ROME/MEMIT's code, 1 in PMET's
    autocast: str | None = None  # "bfloat16" / "float16": forward and backward under torch.autocast
    drop_stopped: bool = True  # a request that reached nll_stop leaves the batch's forward passes
    reuse_prefix: bool = True  # upper blocks run only the columns δ reaches (needs reuse_lower)
    one_projection: bool = True  # target and KL positions unembedded together
    cast_once: bool = True  # autocast: upper matrices and the unembedding cast once per batch, not per call
    # on CPU, attention in the loop by PyTorch's "math" kernel: the default (flash attention) has a
    # slow backward at the loop's few-query shapes; other devices keep their default kernel
    math_attention: bool = True
    # NLL and KL over the vocabulary in chunks (core.lse): no [N, V] float32 logits, which saves
    # memory, but measured no faster on this CPU (docs/benchmarks.md), so off by default
    fused_loss: bool = False
    # Between exact steps, the loss reads only a candidate vocabulary: the top ``vocab_subset``
    # tokens of every loss position and of every unedited KL distribution, plus the target tokens,
    # with the rest of the softmax's normaliser frozen at its value of the last exact step. Every
    # ``vocab_refresh``-th step (and every step whose batch just shrank) is exact and chooses the
    # candidates anew. Changes z a little (a quality lever, not a speed switch); 0: off.
    vocab_subset: int = 0
    vocab_refresh: int = 5

    def __post_init__(self):
        if self.autocast not in (None, "bfloat16", "float16"):
            raise ValueError(f"autocast must be None, 'bfloat16' or 'float16', got {self.autocast!r}")
        if self.vocab_subset < 0 or self.vocab_refresh < 1:
            raise ValueError(f"vocab_subset must be >= 0 and vocab_refresh >= 1, got {self.vocab_subset}, "
                             f"{self.vocab_refresh}")


@dataclass
class TargetResult:
    z: torch.Tensor  # [d] target at the site
    h: torch.Tensor  # [d] the site's value before the edit (bare prompt)
    nll_start: float
    nll_end: float
    steps: int
    seconds: float
    history: list[float] = field(default_factory=list)
    joint_z: torch.Tensor | None = None  # [d] target at cfg.joint_site, when there is one
    joint_h: torch.Tensor | None = None
    from_cache: bool = False  # taken from a cache: ``seconds`` is 0, nothing was optimised now

    @property
    def delta(self) -> torch.Tensor:
        return self.z - self.h


def target_summaries(requests: list[EditRequest], results: list[TargetResult]) -> list[dict]:
    """One JSON-ready line per request: case id, NLL before/after, steps, norms, whether cached."""
    out = []
    for q, r in zip(requests, results):
        t = {"case_id": q.case_id, "nll_start": r.nll_start, "nll_end": r.nll_end, "steps": r.steps,
             "delta_norm": float(r.delta.norm()), "h_norm": float(r.h.norm()), "cached": r.from_cache}
        if r.joint_z is not None:  # PMET's attention target, optimised beside z
            t.update(attn_delta_norm=float((r.joint_z - r.joint_h).norm()), attn_h_norm=float(r.joint_h.norm()))
        out.append(t)
    return out


def _site_module(lm, site: str, layer: int):
    ad = lm.adapter
    names = {"w_out": ad.w_out_name, "block": ad.block_name, "attn": ad.attn_name}
    return ad.module(names[site](layer))


def compute_target(lm, request: EditRequest, templates: list[str], cfg: TargetConfig) -> TargetResult:
    """Optimise δ for one request (see :func:`compute_targets`)."""
    return compute_targets(lm, [request], templates, cfg)[0]


def compute_targets(lm, requests: list[EditRequest], templates: list[str], cfg: TargetConfig,
                    batch_size: int = 16, cache=None, workers: int = 1) -> list[TargetResult]:
    """Optimise one δ per request, ``batch_size`` requests per forward pass.

    ``templates[0]`` must be the bare ``"{}"`` template. Requests in a batch are independent:
    each has its own rows, its own δ, its own early stop and norm clamp, and Adam acts per
    coordinate, so the result is the same as optimising them one at a time (up to float
    noise). The model is not changed. With a ``cache`` (see the module docstring) only the
    requests it does not hold are optimised. ``workers`` > 1 (CPU): that many one-thread
    processes optimise whole batches side by side (:func:`fedit.core.workers.fork_map`), with
    the same results; each result's ``seconds`` is then its batch's time in its worker.
    """
    out: list[TargetResult | None] = [None] * len(requests)
    keys = cache.keys(lm, requests, templates, cfg) if cache is not None else None
    if keys is not None:
        out = [cache.get(k) for k in keys]
    todo = [i for i, r in enumerate(out) if r is None]
    bs = max(1, batch_size)
    batches = [todo[s:s + bs] for s in range(0, len(todo), bs)]

    def run(b: int, bar: progress.Task) -> list[TargetResult]:
        idx = batches[b]
        which = f"{b * bs + 1}-{b * bs + len(idx)}" if len(idx) > 1 else f"{b * bs + 1}"
        return _optimise(lm, [requests[i] for i in idx], templates, cfg, bar, f"{which}/{len(todo)}")

    with progress.task("target vectors", total=len(batches) * cfg.steps, unit="step") as bar:
        for b, results in workers_mod.fork_map(run, range(len(batches)), workers if lm.device.type == "cpu" else 1,
                                               bar):
            for i, r in zip(batches[b], results):
                out[i] = r
                if keys is not None:
                    cache.put(keys[i], r)
    return out


def _optimise(lm, requests: list[EditRequest], templates: list[str], cfg: TargetConfig,
              bar: progress.Task = progress.Task(None), which: str = "") -> list[TargetResult]:
    t0 = time.perf_counter()
    tok, ad, dev = lm.tokenizer, lm.adapter, lm.device
    n, R = len(requests), len(templates)
    tgts = [target_ids(tok, r.target_new) for r in requests]

    # Rows: per request, every template + prompt + target[:-1]; then one KL row per request.
    rw = subject_batch(tok, templates, requests, suffix_ids=[t[:-1] for t in tgts])
    seqs = [row[: int(k)].tolist() for row, k in zip(rw.input_ids, rw.lengths)]
    lookup = rw.lookup.tolist()
    kl_cols = []
    for r in requests:
        kl_ids, kl_idx = last_token_of_span(tok, r.subject.join(cfg.kl_prompt.split("{}", 1)),
                                            cfg.kl_prompt.index("{}") + len(r.subject))
        seqs.append(kl_ids)
        lookup.append(kl_idx)
        kl_cols.append(len(kl_ids) - 1)
    ids, mask = pad(seqs, pad_id(tok))
    ids, mask = ids.to(dev), mask.to(dev)
    owner = torch.cat([torch.arange(n).repeat_interleave(R), torch.arange(n)]).to(dev)  # request of each row
    lookup_t = torch.tensor(lookup, device=dev)

    # Positions whose logits predict target tokens: prompt length P, target token j at P-1+j.
    rows, cols, toks, weight, req_of = [], [], [], [], []
    for i, t in enumerate(tgts):
        m = len(t)
        for r in range(i * R, (i + 1) * R):
            P = len(seqs[r]) - (m - 1)
            rows += [r] * m
            cols += list(range(P - 1, P - 1 + m))
            toks += t
            weight += [1.0 / (m * R)] * m  # mean over tokens, then over templates
            req_of += [i] * m
    rows, cols, toks = (torch.tensor(x, device=dev) for x in (rows, cols, toks))
    weight, req_of = torch.tensor(weight, device=dev), torch.tensor(req_of, device=dev)
    kl_rows = torch.arange(n * R, n * R + n, device=dev)
    kl_cols_t = torch.tensor(kl_cols, device=dev)

    sites = [_site_module(lm, s, cfg.layer) for s in [cfg.site] + ([cfg.joint_site] if cfg.joint_site else [])]
    onehot = torch.zeros(ids.shape[0], ids.shape[1], 1, device=dev)
    onehot[torch.arange(ids.shape[0], device=dev), lookup_t] = 1.0

    # Initial values at the site (bare prompt = first row of each request), unedited KL targets.
    blocks = list(ad.blocks())
    start = cfg.layer  # first block whose output depends on δ

    def precision():
        return torch.autocast(dev.type, dtype=getattr(torch, cfg.autocast)) if cfg.autocast else nullcontext()

    with precision(), torch.no_grad(), capture({"start": blocks[start]}, inputs=True) as st, \
            capture({str(i): m for i, m in enumerate(sites)}) as so, record_block_calls(blocks) as calls, \
            record_function("targets.first_forward"):
        final = ad.body()(input_ids=ids, attention_mask=mask).last_hidden_state
    bare = torch.arange(n, device=dev) * R
    hs = [so[str(i)]["output"][bare, lookup_t[bare]].float().clone() for i in range(len(sites))]  # each [n, d]
    start_input = st["start"]["input"]
    with precision(), torch.no_grad():
        kl_init = F.log_softmax(ad.logits(final[kl_rows, kl_cols_t]).float(), -1)  # [n, V]

    deltas = [torch.zeros_like(h, requires_grad=True) for h in hs]
    opt = torch.optim.Adam(deltas, lr=cfg.lr)
    h_norms = [h.norm(dim=-1) for h in hs]  # each [n]
    max_norms = [cfg.clamp * hn for hn in h_norms]

    # The upper blocks' matrices in the autocast precision for the whole loop (see cast_once).
    with _matrices_cast(blocks[start:], getattr(torch, cfg.autocast) if cfg.cast_once and cfg.autocast else None):
        plan = None
        if cfg.reuse_prefix and cfg.reuse_lower:
            cfg_m = getattr(lm.model, "config", None)
            try:
                with precision():
                    plan = prefix.plan(blocks, calls, start, start_input, lookup_t, mask.sum(-1),
                                       getattr(cfg_m, "_attn_implementation", None),
                                       getattr(cfg_m, "sliding_window", None))
            except (RuntimeError, TypeError, ValueError, KeyError, IndexError) as e:  # an unusual block: full rows
                log.warning("suffix passes unavailable for this model (%s); running full rows", e)
                plan = None
        if plan is not None:  # every later pass runs each row from its δ column on (see core.prefix)
            shift = plan.shift
            assert bool((cols >= shift[rows]).all()) and bool((kl_cols_t >= shift[kl_rows]).all())
            cols, kl_cols_t = cols - shift[rows], kl_cols_t - shift[kl_rows]
            start_input, calls = plan.hidden, plan.named
            onehot = torch.zeros(ids.shape[0], plan.length, 1, device=dev)
            onehot[:, 0] = 1.0

        # Under autocast every matrix product casts its float32 weight on every call: for Gemma 3's
        # 262k x 640 unembedding that copy costs more than the product. With cast_once the
        # unembedding and the upper blocks' matrices are cast once for the batch (the same rounding
        # autocast applies, so the same numbers) and put back afterwards.
        w_lp = None
        if cfg.cast_once and cfg.autocast:
            w_lp = ad.unembed().weight.detach().to(getattr(torch, cfg.autocast))

        def unembed(x):
            return ad.logits(x, weight=w_lp)

        # The fused loss needs plain logits W h: no bias, no soft-capping (Gemma 2 caps them).
        fused = bool(cfg.fused_loss and cfg.one_projection and getattr(ad.unembed(), "bias", None) is None
                     and not getattr(getattr(lm.model, "config", None), "final_logit_softcapping", None))
        w_loss = w_lp if w_lp is not None else ad.unembed().weight.detach()

        def adder(delta, v: _Rows):
            def add_delta(out):
                return out + (v.onehot * delta[v.owner][:, None, :]).to(out.dtype)
            return add_delta

        def forward_final(v: _Rows) -> torch.Tensor:
            with ExitStack() as stack:
                for m, d in zip(sites, deltas):
                    stack.enter_context(edit_output(m, adder(d, v)))
                if v.kv is not None:
                    return ad.final_norm()(prefix.run(blocks, plan, start, v.start_input, v.calls, v.kv))
                if cfg.reuse_lower:
                    x = v.start_input
                    for j in range(start, len(blocks)):
                        x = call_block(blocks[j], v.calls[j], x)
                    return ad.final_norm()(x)
                return ad.body()(input_ids=v.ids, attention_mask=v.mask).last_hidden_state

        active = torch.ones(n, dtype=torch.bool, device=dev)
        history: list[list[float]] = [[] for _ in range(n)]
        steps = torch.zeros(n, dtype=torch.long)
        full = _Rows(ids, mask, start_input, calls, onehot, owner, rows, cols, toks, weight, req_of, kl_rows,
                     kl_cols_t, kl_init, torch.arange(n, device=dev), plan.kv if plan is not None else None)
        view = full
        sub: _Candidates | None = None
        exact = True
        for it in range(cfg.steps + 1):
            with precision(), prefix.math_kernel(cfg.math_attention and dev.type == "cpu"):
                with record_function("targets.upper_forward"):
                    final = forward_final(view)
            if fused:  # NLL and KL straight from the hidden states, the vocabulary in chunks (core.lse)
                with record_function("targets.projection"):
                    h_all = final[torch.cat([view.rows, view.kl_rows]), torch.cat([view.cols, view.kl_cols])]
                    p0 = view.kl_init.exp()
                    ce = lse.soft_cross_entropy(h_all, w_loss, torch.cat([view.toks, torch.full_like(view.kl_cols, -1)]),
                                                p0)
                tok_nll = ce[:len(view.rows)] * view.weight
                k = len(view.live)
                nll = torch.zeros(k, device=dev).index_add(0, view.req_of, tok_nll)  # [k] live requests
                kl = ce[len(view.rows):] + (p0 * view.kl_init).sum(-1)  # cross-entropy − entropy of P_orig
            elif cfg.one_projection:  # target and KL positions in one product with the unembedding
                h_pos = final[torch.cat([view.rows, view.kl_rows]), torch.cat([view.cols, view.kl_cols])]
                exact = not cfg.vocab_subset or sub is None or sub.view is not view or it % cfg.vocab_refresh == 0
                if exact:
                    with record_function("targets.projection"), precision():
                        both = unembed(h_pos)
                    with record_function("targets.projection"):
                        if cfg.vocab_subset:
                            sub = _Candidates.choose(both.detach().float(), view, cfg.vocab_subset, w_loss)
                        both = F.log_softmax(both.float(), -1)
                    logp, kl_logp = both[:len(view.rows)], both[len(view.rows):]
                else:  # the candidates only, the rest of the normaliser as it was at the last exact step
                    with record_function("targets.projection"), precision():
                        part = ad.logits(h_pos, weight=sub.weight, vocab=sub.vocab)
                    with record_function("targets.projection"):
                        part = lse.candidate_log_softmax(part, sub.tail)
                    nr = len(view.rows)
                    tok_nll = -part[:nr].gather(1, sub.tok_at[:, None])[:, 0] * view.weight
                    k = len(view.live)
                    nll = torch.zeros(k, device=dev).index_add(0, view.req_of, tok_nll)
                    with record_function("targets.kl"):
                        kl = (sub.p0 * (sub.logp0 - part[nr:])).sum(-1)
            else:
                with record_function("targets.projection"), precision():
                    logits = ad.logits(final[view.rows, view.cols])
                with record_function("targets.projection"):
                    logp = F.log_softmax(logits.float(), -1)  # [N, V]
                with record_function("targets.kl"), precision():
                    kl_logits = ad.logits(final[view.kl_rows, view.kl_cols])
                kl_logp = F.log_softmax(kl_logits.float(), -1)
            if not fused and (not cfg.one_projection or exact):
                tok_nll = -logp.gather(1, view.toks[:, None])[:, 0] * view.weight
                k = len(view.live)
                nll = torch.zeros(k, device=dev).index_add(0, view.req_of, tok_nll)  # [k] live requests
                with record_function("targets.kl"):
                    kl = (view.kl_init.exp() * (view.kl_init - kl_logp)).sum(-1)  # KL(P_orig ‖ P_δ), [k]
            wd = sum(cfg.weight_decay * d[view.live].norm(dim=-1) / hn[view.live] ** cfg.decay_power
                     for d, hn in zip(deltas, h_norms))
            loss = nll + cfg.kl_factor * kl + wd
            live_active = active[view.live]
            for j, i in enumerate(view.live.tolist()):
                if live_active[j]:
                    history[i].append(float(nll[j].detach()))
            active[view.live] = live_active & (nll.detach() >= cfg.nll_stop)
            stop = it == cfg.steps or not bool(active.any())
            bar.update(cfg.steps - it if stop else 1, request=which, step=f"{it + (not stop)}/{cfg.steps}",
                       nll=float(nll.detach().mean()))  # an early stop moves the bar to the batch's end
            if stop:
                break
            frozen = [d.detach().clone() for d in deltas]
            opt.zero_grad()
            with record_function("targets.backward"), prefix.math_kernel(cfg.math_attention and dev.type == "cpu"):
                (loss * active[view.live]).sum().backward()
            opt.step()
            steps += active.cpu().long()
            with torch.no_grad():
                for d, f, mx in zip(deltas, frozen, max_norms):
                    d[~active] = f[~active]  # stopped requests keep their δ (Adam's momentum aside)
                    norms = d.norm(dim=-1)
                    over = norms > mx
                    d[over] *= (mx[over] / norms[over])[:, None]
            if cfg.drop_stopped and not bool(active[view.live].all()):
                view = full.select(torch.nonzero(active).flatten(), n, R)
    seconds = (time.perf_counter() - t0) / n
    zs = [(h + d).detach() for h, d in zip(hs, deltas)]
    j = len(zs) > 1
    return [TargetResult(z=zs[0][i], h=hs[0][i], nll_start=history[i][0], nll_end=history[i][-1], steps=int(steps[i]),
                         seconds=seconds, history=history[i], joint_z=zs[1][i] if j else None,
                         joint_h=hs[1][i] if j else None) for i in range(n)]


@dataclass
class _Candidates:
    """The candidate vocabulary of :attr:`TargetConfig.vocab_subset` for one view of a batch."""

    view: object  # the _Rows these were chosen for
    vocab: torch.Tensor  # [U] token ids, sorted
    weight: torch.Tensor | None  # their rows of the loop's unembedding (None only in unit tests)
    tail: torch.Tensor  # [N + k] log Σ exp(logits) over the tokens not in ``vocab``, frozen
    tok_at: torch.Tensor  # [N] index in ``vocab`` of each target position's token
    p0: torch.Tensor  # [k, U] the unedited KL distributions at the candidates
    logp0: torch.Tensor  # [k, U]

    @staticmethod
    def choose(logits: torch.Tensor, view, k: int, w_full: torch.Tensor | None) -> "_Candidates":
        """From exact logits [N + k, V] (target positions, then KL positions) of ``view``."""
        k = min(k, logits.shape[-1])
        vocab, tail = lse.candidate_vocab(logits, k, view.kl_init.topk(k, -1).indices, view.toks)
        tok_at = torch.searchsorted(vocab, view.toks)
        logp0 = view.kl_init[:, vocab]
        return _Candidates(view, vocab, None if w_full is None else w_full[vocab], tail, tok_at, logp0.exp(), logp0)


@contextmanager
def _matrices_cast(modules, dtype):
    """Cast the 2-D weights of ``modules`` to ``dtype`` while open; restore the originals after.

    Under autocast a matrix product casts its weight on every call; casting once gives the same
    numbers. The original tensors are put back however the block exits. ``dtype=None``: no-op.
    """
    saved = []
    try:
        if dtype is not None:
            for mod in modules:
                for p in mod.parameters():
                    if p.dim() == 2 and p.dtype != dtype and p.dtype.is_floating_point:
                        saved.append((p, p.data))
                        p.data = p.data.to(dtype)
        yield
    finally:
        for p, data in saved:
            p.data = data


def _take_rows(x, sel: torch.Tensor, B: int):
    """``x`` (a block call's argument: tensor, tuple, list or dict) with only batch rows ``sel``.

    A tensor is taken to be batched when it has at least two dimensions and ``B`` rows;
    broadcast ones (``[1, T, ...]`` position embeddings and ids) and everything else pass as is.
    """
    if isinstance(x, torch.Tensor):
        return x[sel] if x.dim() >= 2 and x.shape[0] == B else x
    if isinstance(x, (tuple, list)):
        return type(x)(_take_rows(y, sel, B) for y in x)
    if isinstance(x, dict):
        return {k: _take_rows(v, sel, B) for k, v in x.items()}
    return x


@dataclass
class _Rows:
    """The rows of a target batch that are run: all requests', or only the live ones'."""

    ids: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T]
    start_input: torch.Tensor  # [B, T, d] input of the site's block
    calls: list  # each block's recorded (args, kwargs)
    onehot: torch.Tensor  # [B, T, 1] where δ is added
    owner: torch.Tensor  # [B] request (index into all n) of each row
    rows: torch.Tensor  # [N] target positions: row, column, token, weight,
    cols: torch.Tensor
    toks: torch.Tensor
    weight: torch.Tensor
    req_of: torch.Tensor  # [N] index into ``live``
    kl_rows: torch.Tensor  # [k]
    kl_cols: torch.Tensor  # [k]
    kl_init: torch.Tensor  # [k, V]
    live: torch.Tensor  # [k] the requests (indices into all n) these rows belong to
    kv: dict | None = None  # suffix passes: each upper layer's keys/values of the full rows

    def select(self, live: torch.Tensor, n: int, R: int) -> "_Rows":
        """The rows of requests ``live`` only (``self`` must hold all ``n`` requests, R templates each)."""
        k, dev = len(live), live.device
        sel = torch.cat([(live[:, None] * R + torch.arange(R, device=dev)).flatten(), n * R + live])  # old rows
        new_row = torch.full((self.ids.shape[0],), -1, dtype=torch.long, device=dev)
        new_row[sel] = torch.arange(len(sel), device=dev)
        new_req = torch.full((n,), -1, dtype=torch.long, device=dev)
        new_req[live] = torch.arange(k, device=dev)
        keep = new_req[self.req_of] >= 0  # target positions of live requests
        B = self.ids.shape[0]
        return _Rows(self.ids[sel], self.mask[sel], self.start_input[sel], _take_rows(self.calls, sel, B),
                     self.onehot[sel], self.owner[sel], new_row[self.rows[keep]], self.cols[keep],
                     self.toks[keep], self.weight[keep], new_req[self.req_of[keep]],
                     torch.arange(k * R, k * R + k, device=dev), self.kl_cols[live], self.kl_init[live], live,
                     None if self.kv is None else _take_rows(self.kv, sel, B))
