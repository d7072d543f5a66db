"""Statistics as exact integers, for secure aggregation that sums integers (Flower's SecAgg+).

SecAgg+ as Flower implements it (``flwr`` 1.41) sums *integer* vectors modulo 2³²: each client
clips its floats to [−c, c], quantises them stochastically to 2²² levels, and the server
dequantises the masked sum. With its defaults (c = 8) the step is 3.8·10⁻⁶, far from float64,
and R Kᵀ and K Kᵀ of a real model exceed 8 by orders of magnitude.

We make the quantiser exact instead of fighting it. With c = 2²¹ and 2²² levels the quantiser
maps v to v + 2²¹, exactly, for every integer v in [−2²¹, 2²¹], and stochastic rounding of an
integer is the integer itself. So each client writes every statistic x as fixed-point limbs

    x = 2^e · (a₀·2⁻²⁰ + a₁·2⁻⁴⁰ + a₂·2⁻⁶⁰),   integers |a_j| < 2²⁰

with one exponent e per tensor shared by all clients (the largest any client needs), sends
the limbs, and the server decodes the limb sums. Sums of N clients stay below 2³² for
N < 1024. The result equals the float64 sum up to 2^(e−60) per entry (the truncation of each
client's last limb), i.e. ~2⁻⁶⁰ relative to the largest statistic: the merged edit is the exact
one at float64 precision. K Kᵀ is symmetric, so only its upper triangle travels.

This module knows nothing of Flower: it only maps statistics to integer-valued arrays and back.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedit.errors import FeditError
from fedit.methods.vectors import LayerSums

LIMB_BITS = 20
LIMBS = 3
CLIP = float(2 ** 21)  # SecAgg+ clipping_range that makes its quantiser the identity on integers
LEVELS = 2 ** 22  # SecAgg+ quantization_range
MODULUS = 2 ** 32  # SecAgg+ modulus_range
MAX_CLIENTS = MODULUS // LEVELS - 1  # the masked sum of this many clients cannot wrap around
NO_EXPONENT = -1100  # exponent of an all-zero tensor (below any float64)


class SecureSumError(FeditError):
    """Statistics that cannot be carried exactly through integer secure aggregation."""


def tensor_names(layers: list[int]) -> list[str]:
    return [n for l in layers for n in (f"rk.{l}", f"kk.{l}")]


def exponent(t: torch.Tensor) -> int:
    """Smallest e with max|t| < 2^e (``NO_EXPONENT`` for zeros)."""
    m = float(t.abs().max()) if t.numel() else 0.0
    if not math.isfinite(m):
        raise SecureSumError("statistics hold NaN or Inf.", "recompute the edit vectors.")
    return NO_EXPONENT if m == 0 else math.frexp(m)[1]


def _flat(stats: dict[int, LayerSums], layers: list[int], shapes: dict[int, tuple[int, int]]) -> dict[str, torch.Tensor]:
    out = {}
    for l in layers:
        d_out, d_in = shapes[l]
        st = stats.get(l)
        rk = st.RK.double() if st is not None else torch.zeros(d_out, d_in, dtype=torch.float64)
        kk = st.KK.double() if st is not None else torch.zeros(d_in, d_in, dtype=torch.float64)
        iu = torch.triu_indices(d_in, d_in)
        out[f"rk.{l}"] = rk.reshape(-1)
        out[f"kk.{l}"] = kk[iu[0], iu[1]]
    return out


def exponents(stats: dict[int, LayerSums], layers: list[int], shapes: dict[int, tuple[int, int]]) -> dict[str, int]:
    """What a client tells the server before the secure sum: one exponent per tensor."""
    return {n: exponent(t) for n, t in _flat(stats, layers, shapes).items()}


def encode(stats: dict[int, LayerSums], layers: list[int], shapes: dict[int, tuple[int, int]],
           exps: dict[str, int]) -> list[np.ndarray]:
    """Integer-valued float64 limbs of every tensor (``LIMBS`` arrays per tensor, in order)."""
    out = []
    for name, t in _flat(stats, layers, shapes).items():
        e = exps[name]
        if e < exponent(t):
            raise SecureSumError(f"{name} needs exponent {exponent(t)}, the server allowed {e}.",
                                 "send every client's exponent before the sum; the server takes the largest.")
        y = np.ldexp(t.numpy(), -e) if e > NO_EXPONENT else np.zeros(t.numel())  # |y| < 1, exact
        for _ in range(LIMBS):
            y = np.ldexp(y, LIMB_BITS)
            a = np.trunc(y)
            y = y - a  # exact: the fractional part of a float64
            out.append(a)
    return out


def decode(limb_sums: list[np.ndarray], layers: list[int], shapes: dict[int, tuple[int, int]],
           exps: dict[str, int], n: int) -> dict[int, LayerSums]:
    """Per-layer summed statistics from the sums of every client's limbs (``n``: facts in all)."""
    names = tensor_names(layers)
    if len(limb_sums) != LIMBS * len(names):
        raise SecureSumError(f"got {len(limb_sums)} summed arrays, expected {LIMBS * len(names)}.",
                             "every client must send the limbs of the same layers.")
    vals: dict[str, torch.Tensor] = {}
    for k, name in enumerate(names):
        parts = limb_sums[k * LIMBS:(k + 1) * LIMBS]
        x = np.zeros_like(parts[0], dtype=np.float64)
        for j, a in enumerate(parts):
            if not np.array_equal(a, np.round(a)):
                raise SecureSumError(f"the secure sum of {name} is not integer.", "check the SecAgg+ settings.")
            x = x + np.ldexp(a.astype(np.float64), -LIMB_BITS * (j + 1))
        e = exps[name]
        vals[name] = torch.from_numpy(np.ldexp(x, e) if e > NO_EXPONENT else np.zeros_like(x))
    out = {}
    for l in layers:
        d_out, d_in = shapes[l]
        kk = torch.zeros(d_in, d_in, dtype=torch.float64)
        iu = torch.triu_indices(d_in, d_in)
        kk[iu[0], iu[1]] = vals[f"kk.{l}"]
        kk = kk + kk.triu(1).T
        out[l] = LayerSums(RK=vals[f"rk.{l}"].reshape(d_out, d_in), KK=kk, n=n)
    return out
