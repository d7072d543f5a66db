"""Run the blocks above an edit site on the positions an edit can change, and no others.

A target optimisation (``core.targets``) adds δ at one position of each row (the subject's last
token, column ``c`` of that row) at one layer. In a causal model every earlier position's states,
at that layer and above, never see δ: they are the same on every optimisation step. Only columns
``c, c+1, …`` of a row change, and only they feed the logits the losses read (the target tokens
and the KL position all come at or after ``c``). So the upper blocks can run on each row's
*suffix* alone, its queries attending to the keys and values its prefix had in the first, full
pass, which are recorded once.

:func:`plan` builds that: the suffix of each row, left-aligned (row ``r``'s column ``i`` is its
original column ``c_r + i``, right-padded to the longest suffix), each upper block's recorded
call rewritten for it (attention mask, rotary position embeddings and position ids gathered at
the suffix columns), and each layer's keys and values of the full rows. A block is then called
with a :class:`PrefixKV` in its cache argument, whose ``update`` prepends the full rows' keys and
values to the suffix's own; the gathered mask lets column ``i`` of row ``r`` attend to full-row
keys before ``c_r`` and to suffix keys up to ``i``, exactly what it attended to in the full pass.

It works with any block that takes a transformers ``Cache``-like argument (``cache``,
``past_key_values``, ``past_key_value`` or ``layer_past``) and calls ``update(key, value,
layer_idx)`` on it, and whose other sequence-shaped arguments are the ones named here; anything
else makes :func:`plan` return ``None`` and the caller runs the full rows as before.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from fedit.core.hooks import bind_call, call_block_named

log = logging.getLogger(__name__)

CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")
_DROPPED = ("cache_position",)  # per-position bookkeeping of generation caches: not needed here


class PrefixKV:
    """A stand-in for a transformers cache: records, or prepends, each layer's keys and values.

    ``PrefixKV()`` records what each attention layer computes (and returns it unchanged);
    ``PrefixKV(kv)`` returns ``kv[layer]`` concatenated before the keys/values it is given.
    """

    def __init__(self, kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.recording = kv is None
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {} if kv is None else kv

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.recording:
            self.kv[layer_idx] = (key.detach(), value.detach())
            return key, value
        k0, v0 = self.kv[layer_idx]
        return torch.cat([k0.to(key.dtype), key], dim=-2), torch.cat([v0.to(value.dtype), value], dim=-2)


@dataclass
class SuffixPlan:
    hidden: torch.Tensor  # [B, L, d] input of the first upper block at the suffix columns
    named: list  # per block: its call as keyword arguments, rewritten for the suffix (None below the site)
    cache_arg: list  # per block: the name of its cache argument (None below the site)
    kv: dict  # layer index -> (keys, values) of the full rows, [B, heads, T, head_dim]
    shift: torch.Tensor  # [B] c_r: suffix column i of row r is full column c_r + i
    length: int  # L
    end: int  # the blocks planned are blocks[start:end]


def _cache_arg(block: nn.Module, named: dict) -> str | None:
    params = inspect.signature(block.forward).parameters
    for name in CACHE_ARGS:
        if name in params or name in named:
            return name
    return None


def _allowed(mask: torch.Tensor | None, B: int, T: int, dev) -> torch.Tensor:
    """The recorded attention mask as booleans ``[B, h, T, T]`` (True: may attend)."""
    if mask is None:
        return torch.ones(T, T, dtype=torch.bool, device=dev).tril()[None, None].expand(B, 1, T, T)
    if mask.dtype == torch.bool:
        m = mask
    else:  # additive: 0 where allowed, a very negative number (or -inf) where not
        m = mask > torch.finfo(mask.dtype).min / 2
    if m.dim() != 4 or m.shape[-1] != T or m.shape[-2] != T:
        raise ValueError(f"attention mask of shape {tuple(mask.shape)}")
    return m.expand(B, m.shape[1], T, T)


def _suffix_mask(mask, B: int, T: int, shift: torch.Tensor, L: int, dev) -> torch.Tensor:
    """Mask for suffix queries over [full-row keys (T), suffix keys (L)], in the recorded form."""
    if mask is not None:  # masks live where the model computed them (device_map: maybe elsewhere)
        dev = mask.device
        shift = shift.to(dev)
    allowed = _allowed(mask, B, T, dev)
    h = allowed.shape[1]
    i = torch.arange(L, device=dev)
    pos = shift[:, None] + i[None, :]  # [B, L] full column of each suffix column
    valid = pos < T
    q = pos.clamp(max=T - 1)
    rows = allowed[torch.arange(B, device=dev)[:, None], :, q]  # [B, L, h, T]
    rows = rows.permute(0, 2, 1, 3)  # [B, h, L, T]
    j = torch.arange(T, device=dev)
    full_part = rows & (j[None, None, None, :] < shift[:, None, None, None])  # keys before c_r
    suf_keys = torch.gather(rows, 3, q[:, None, None, :].expand(B, h, L, L))  # key column c_r + j'
    suf_part = suf_keys & valid[:, None, None, :] & (i[None, :] <= i[:, None])[None, None]
    suf_part = suf_part & valid[:, None, :, None]
    # A padding query (beyond its row) attends to itself only, so no softmax row is empty.
    eye = torch.eye(L, dtype=torch.bool, device=dev)[None, None] & ~valid[:, None, :, None]
    out = torch.cat([full_part & valid[:, None, :, None], suf_part | eye], dim=-1)
    if mask is None or mask.dtype == torch.bool:
        return out
    zero = torch.zeros((), dtype=mask.dtype, device=dev)
    return torch.where(out, zero, torch.tensor(torch.finfo(mask.dtype).min, dtype=mask.dtype, device=dev))


def _gather_cols(x: torch.Tensor, q: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """``x[b, q[b, i]]`` for a ``[1 or B, T, ...]`` tensor -> ``[B, L, ...]``."""
    x = x.expand(B, *x.shape[1:])
    q = q.to(x.device)
    idx = q.reshape(B, -1, *([1] * (x.dim() - 2))).expand(B, q.shape[1], *x.shape[2:])
    return torch.gather(x, 1, idx)


def plan(blocks, calls, start: int, start_input: torch.Tensor, shift: torch.Tensor, lengths: torch.Tensor,
         attn_implementation: str | None = None, window: int | None = None, end: int | None = None
         ) -> SuffixPlan | None:
    """Prepare suffix-only passes of ``blocks[start:end]`` (see the module docstring), or ``None``.

    ``calls`` are the blocks' recorded calls of a full pass over rows whose input to
    ``blocks[start]`` was ``start_input`` [B, T, d]; ``shift`` [B] is each row's first column
    that δ reaches, ``lengths`` [B] each row's length; ``attn_implementation`` and ``window``
    (the model's sliding attention window) say whether a causal mask can stand in for a
    recorded ``None``. Runs the upper blocks once (no grad) to
    record their keys and values.
    """
    B, T = start_input.shape[:2]
    dev = start_input.device
    end = len(blocks) if end is None else end
    L = int((lengths - shift).max())
    if L <= 0 or L >= T:
        return None  # nothing to gain
    i = torch.arange(L, device=dev)
    q = (shift[:, None] + i[None, :]).clamp(max=T - 1)
    named_all: list = [None] * len(blocks)
    cache_args: list = [None] * len(blocks)
    for j in range(start, end):
        try:
            named = bind_call(blocks[j], calls[j])
        except TypeError as e:
            log.debug("prefix reuse off: %s", e)
            return None
        ca = _cache_arg(blocks[j], named)
        if ca is None:
            log.debug("prefix reuse off: %s has no cache argument", type(blocks[j]).__name__)
            return None
        new = {}
        for name, v in named.items():
            if name == "hidden_states" or name == ca:
                continue
            if name in _DROPPED:
                new[name] = None
            elif name == "attention_mask":
                if v is None and (attn_implementation == "eager" or (window is not None and window < T)):
                    return None  # an additive mask of unknown dtype, or a sliding window, would be needed
                try:
                    new[name] = _suffix_mask(v, B, T, shift, L, dev)
                except ValueError as e:
                    log.debug("prefix reuse off: %s", e)
                    return None
            elif name == "position_embeddings" and isinstance(v, (tuple, list)):
                new[name] = type(v)(_gather_cols(x, q, B, T) for x in v)
            elif name == "position_ids" and isinstance(v, torch.Tensor):
                new[name] = _gather_cols(v, q, B, T)
            elif isinstance(v, torch.Tensor) and v.dim() >= 1 and T in v.shape[1:2]:
                log.debug("prefix reuse off: %s gets a sequence-shaped %r", type(blocks[j]).__name__, name)
                return None
            else:
                new[name] = v
        if "attention_mask" not in named:
            log.debug("prefix reuse off: %s takes no attention mask", type(blocks[j]).__name__)
            return None
        named_all[j], cache_args[j] = new, ca

    rec = PrefixKV()
    with torch.no_grad():
        x = start_input
        for j in range(start, end):
            x = call_block_named(blocks[j], bind_call(blocks[j], calls[j]), x, **{cache_args[j]: rec})
    if len(rec.kv) != end - start:
        log.debug("prefix reuse off: %d of %d upper blocks updated the cache", len(rec.kv), end - start)
        return None
    hidden = _gather_cols(start_input, q, B, T)
    return SuffixPlan(hidden, named_all, cache_args, rec.kv, shift, L, end)


def math_kernel(on: bool):
    """A context running attention on PyTorch's "math" kernel (``on``), or nothing.

    On CPU the default kernel for these passes is flash attention, whose backward costs ~12x
    its forward at a few queries over a few dozen keys; the math kernel gives the same numbers
    (float noise) several times cheaper there. Callers turn it on for CPU only."""
    if not on:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.MATH)


def run(blocks, p: SuffixPlan, start: int, hidden: torch.Tensor, named: list, kv: dict) -> torch.Tensor:
    """Run ``blocks[start:p.end]`` on suffix hidden states with prefix keys/values ``kv``.

    ``named`` and ``kv`` are ``p.named`` and ``p.kv``, or a selection of their rows."""
    cache = PrefixKV(kv)
    x = hidden
    for j in range(start, p.end):
        x = call_block_named(blocks[j], named[j], x, **{p.cache_arg[j]: cache})
    return x
