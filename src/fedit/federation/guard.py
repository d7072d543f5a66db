"""Bounds on what a FedEdit client receives: shapes, norms and the base model, all measured by
the receiver on its own model, never taken from the message or the run config.

A received MKV (the vector the server indexes, and in private mode per edited layer a key k_l
and a W_out-space residual r_l; ``z`` too when the index is δ = z − h) is accepted only when

- it was measured on this client's base model: the fingerprint its sender states equals the
  one this client recomputes from its own weights (``model_identity``);
- every tensor has the shape this model gives it (z, δ: [d_model]; key.l: [d_in of W_out at l];
  resid.l: [d_out of W_out at l]) and exactly the layers this client edits;
- every value is finite;
- every norm is at most ``factor`` times the model's own scale for that kind of vector: the
  median norm, over the tokens of a few fixed sentences (``CALIBRATION``, never the sender's
  text), of the hidden state after the last edited layer (z, δ), of W_out's input at layer l
  (key.l) and of W_out's output at layer l (resid.l). The first token is left out: models put
  outlier norms there (attention sinks).

Real MKVs sit far below the default bound (docs/federation.md has the measured ratios); a
residual scaled by 1e15 or a vector from another model does not. A rejected MKV is not
applied; the rest are, and the reason goes into the report. No Flower import.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from fedit.core.hooks import capture, run_until_stop
from fedit.core.tokens import encode, pad, pad_id

log = logging.getLogger(__name__)

# How far above the model's own scale a received vector's norm may lie (FedSettings.norm_factor
# has the same default).
DEFAULT_NORM_FACTOR = 20.0

# Text the receiver measures its own model's scale on: plain sentences, no request of anyone.
CALIBRATION = [
    "The river runs through the middle of the old town, past the market and the church.",
    "She wrote the letter in the morning and posted it before lunch.",
    "Most of the company's products are sold in Europe and in North America.",
    "The committee meets twice a year to review the budget and elect its chair.",
    "He learned to play the piano as a child and later studied music in Vienna.",
    "Heavy rain is expected in the north of the country over the weekend.",
]


@dataclass
class ModelScale:
    """What a receiver measures on its own base model. Norms are medians over calibration tokens."""

    fingerprint: str  # recomputed from this model's weights
    layers: list[int]
    d_model: int
    key_dims: dict[int, int]  # layer -> d_in of W_out
    resid_dims: dict[int, int]  # layer -> d_out of W_out
    h_norm: float  # ‖h‖ after the last edited layer
    key_norms: dict[int, float] = field(default_factory=dict)  # layer -> ‖W_out input‖
    out_norms: dict[int, float] = field(default_factory=dict)  # layer -> ‖W_out output‖

    def bound(self, name: str) -> float:
        """The scale a tensor named ``name`` (``z``/``mkv``, ``key.<l>``, ``resid.<l>``) is measured against."""
        kind, _, layer = name.partition(".")
        if kind == "key":
            return self.key_norms[int(layer)]
        if kind == "resid":
            return self.out_norms[int(layer)]
        return self.h_norm

    def shape(self, name: str) -> tuple[int, ...]:
        kind, _, layer = name.partition(".")
        if kind == "key":
            return (self.key_dims[int(layer)],)
        if kind == "resid":
            return (self.resid_dims[int(layer)],)
        return (self.d_model,)


@torch.no_grad()
def measure_scale(lm, layers: list[int], texts: list[str] | None = None) -> ModelScale:
    """The scale of ``lm`` as it is now (call it on the base weights) at the edited ``layers``."""
    from fedit.models.loading import model_identity

    ad, L = lm.adapter, max(layers)
    seqs = [encode(lm.tokenizer, t) for t in (texts or CALIBRATION)]
    ids, mask = pad(seqs, pad_id(lm.tokenizer))  # [B, T]
    names = {"h": ad.block_name(L), **{l: ad.w_out_name(l) for l in layers}}
    mods = {n: ad.module(n) for n in names.values()}
    with capture(mods, inputs=True, outputs=True, stop_when_done=True) as got:
        run_until_stop(lambda: ad.body()(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device)))
    keep = mask.bool().clone()
    keep[:, 0] = False  # the first token's outlier norms

    def median(t: torch.Tensor) -> float:  # t: [B, T, d] -> median token norm
        return float(t.float().norm(dim=-1).cpu()[keep].median())

    dims = {l: ad.w_out_dims(l) for l in layers}  # (d_out, d_in)
    return ModelScale(
        fingerprint=model_identity(lm.model, lm.name)["fingerprint"], layers=sorted(layers), d_model=ad.d_model,
        key_dims={l: dims[l][1] for l in layers}, resid_dims={l: dims[l][0] for l in layers},
        h_norm=median(got[names["h"]]["output"]),
        key_norms={l: median(got[names[l]]["input"]) for l in layers},
        out_norms={l: median(got[names[l]]["output"]) for l in layers})


@dataclass
class Rejection:
    """A received MKV that was not applied: who sent it, which fact (its token), and why."""

    sender: str
    fact: str
    reason: str
    by: str = ""  # the client (or "server") that refused it
    mkv: int | None = None  # its id in the server's store, when it came from there

    def to_dict(self) -> dict[str, Any]:
        return {"from": self.sender, "fact": self.fact, "reason": self.reason, "by": self.by, "mkv": self.mkv}


class Guard:
    """A receiver's checks of received MKVs against its own model (``scale``), norms up to
    ``factor`` × the model's scale."""

    def __init__(self, scale: ModelScale, factor: float = DEFAULT_NORM_FACTOR):
        if not factor > 0:
            raise ValueError(f"the norm factor must be > 0, got {factor}")
        self.scale, self.factor = scale, factor

    def expected(self, mode: str, match: str) -> set[str]:
        """Tensor names a payload carries in ``mode`` (the index vector ``mkv`` travels apart)."""
        names = {f"{k}.{l}" for l in self.scale.layers for k in ("key", "resid")} if mode == "private" else set()
        return names | ({"z"} if match == "delta" else set())

    def check_tensor(self, name: str, t: Any) -> str | None:
        """Why tensor ``name`` cannot be used (None: it can)."""
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return f"{name} is not a floating-point tensor"
        want = self.scale.shape(name)
        if tuple(t.shape) != want:
            return f"{name} has shape {list(t.shape)}, this model's is {list(want)}"
        if not torch.isfinite(t).all():
            return f"{name} holds NaN or Inf"
        norm, ref = float(t.float().norm()), self.scale.bound(name)
        if norm > self.factor * ref:
            return (f"{name} has norm {norm:.4g}, over the bound {self.factor * ref:.4g} "
                    f"({self.factor:g} × this model's scale {ref:.4g})")
        return None

    def check(self, vector: Any, payload: dict[str, Any], meta: dict[str, Any], mode: str, match: str) -> str | None:
        """Why one received MKV cannot be applied (None: it can). Never quotes request text."""
        stated = meta.get("fingerprint") if isinstance(meta, dict) else None
        if stated != self.scale.fingerprint:
            return (f"it states base model {str(stated)[:32]!r}, this client's base model (recomputed from its "
                    f"weights) is {self.scale.fingerprint!r}")
        why = self.check_tensor("mkv", vector)
        if why:
            return why
        names = set(payload) if isinstance(payload, dict) else set()
        want = self.expected(mode, match)
        if names != want and names != want | {"z"}:  # z itself may travel beside any index vector
            return f"it carries tensors {sorted(map(str, names))[:12]}, this client expects {sorted(want)[:12]}"
        for name, t in sorted(payload.items()):
            why = self.check_tensor(name, t)
            if why:
                return why
        if mode == "paper" and "request" in meta:
            return _check_request(meta["request"])
        return None

    def for_store(self, mode: str, match: str) -> Callable[[Any], str | None]:
        """The check an ``MKVStore`` applies to every record it reads (``MKVStore(..., check=)``)."""
        return lambda m: self.check(m.vector, m.payload, m.meta, mode, match)


def _check_request(request: Any) -> str | None:
    from fedit.requests import EditRequest

    try:
        EditRequest.from_dict(request)
    except Exception as e:  # noqa: BLE001 - any malformed request is a rejection, named by type only
        return f"its request is not a valid edit request ({type(e).__name__})"
    return None
