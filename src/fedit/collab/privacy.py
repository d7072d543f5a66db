"""Differential privacy for CollabEdit's shared sums (the Gaussian mechanism, per fact).

What a client shares per round and edited layer l is R Kᵀ [d_out × d_in] and K Kᵀ [d_in × d_in]
(its upper triangle travels), sums over its facts j of r_j k_jᵀ and k_j k_jᵀ. With DP on, each
client first clips every fact's key and residual column at every layer,

    k_j ← k_j · min(1, C_k/‖k_j‖),   r_j ← r_j · min(1, C_r/‖r_j‖),

so one fact moves R Kᵀ by at most ‖r kᵀ‖_F ≤ C_r·C_k and K Kᵀ by at most ‖k kᵀ‖_F ≤ C_k² (Frobenius,
which bounds the upper triangle too). Then it adds Gaussian noise to its sums with standard
deviations σ_RK = z·C_r·C_k/√t and σ_KK = z·C_k²/√t, z the noise multiplier and t the number of
clients that must take part for the sum to be released (all of them in-process; SecAgg+'s
reconstruction threshold on Flower). A sum over at least t clients then carries noise of
standard deviation at least z·C_r·C_k and z·C_k²: the Gaussian mechanism on the sums with
per-fact L2 sensitivity √(2L) in units of the noise scale (2L blocks, L edited layers), i.e.
μ-Gaussian DP with μ = √(2L)/z per release (Dong, Roth & Su); k releases compose to μ√k.
μ-GDP gives (ε, δ)-DP for every ε with

    δ(ε) = Φ(−ε/μ + μ/2) − e^ε · Φ(−ε/μ − μ/2)

(the analytic Gaussian mechanism, Balle & Wang 2018); ``epsilon`` solves it for ε. The
neighbouring relation is one fact added to or removed from one client's facts; a fact enters
the sums of one round only, so k = 1 for a run. The guarantee covers the sums only, not the
digests, counts and exponents that travel beside them (docs/collab.md).

Noise is drawn from a generator seeded by the client's own secret and the model state, so a
client answering the same question twice (another merge method, a restarted process) sends the
same noisy sums rather than a fresh sample that would average the noise away.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from fedit.errors import FeditError
from fedit.methods.vectors import EditVectors, LayerSums

# Default clipping bounds, from the per-fact norms measured on the default model (Gemma 3 270M,
# layers 3-6, CounterFact facts; docs/collab.md): keys 5-27 (most 6-12), residual shares
# 0.65-5.4 (most 0.8-2), so these clip the larger third or so and leave the rest unchanged.
DEFAULT_CLIP_KEY = 10.0
DEFAULT_CLIP_RESID = 1.5


class PrivacyError(FeditError):
    """DP settings that give no guarantee."""


@dataclass(frozen=True)
class DPConfig:
    """The mechanism's parameters: noise multiplier z, clipping bounds C_k and C_r, δ."""

    noise: float
    clip_key: float
    clip_resid: float
    delta: float = 1e-5
    contributors: int = 1  # t: the noise is split so that any t clients' sum carries all of it

    def __post_init__(self):
        for name in ("noise", "clip_key", "clip_resid"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise PrivacyError(f"DP {name.replace('_', '-')} must be a positive number, got {v!r}.",
                                   "e.g. --dp-noise 1.0 --dp-clip-key 10 --dp-clip-resid 1.5.")
        if not 0 < self.delta < 1:
            raise PrivacyError(f"DP delta must lie in (0, 1), got {self.delta}.", "e.g. --dp-delta 1e-5.")
        if self.contributors < 1:
            raise PrivacyError(f"DP needs at least one contributor, got {self.contributors}.", "pass t ≥ 1.")

    def sigmas(self) -> tuple[float, float]:
        """(σ_RK, σ_KK) each client adds to its own sums."""
        share = math.sqrt(self.contributors)
        return (self.noise * self.clip_resid * self.clip_key / share, self.noise * self.clip_key ** 2 / share)


def clip_rows(t: torch.Tensor, bound: float) -> tuple[torch.Tensor, int]:
    """Rows of ``t`` [n, d] scaled down to L2 norm ≤ ``bound``; (clipped rows, how many were scaled)."""
    t = t.double()
    norms = t.norm(dim=1, keepdim=True)  # [n, 1]
    scale = torch.clamp(bound / norms.clamp_min(1e-300), max=1.0)
    return t * scale, int((scale < 1).sum())


def clipped(vec: EditVectors, cfg: DPConfig) -> tuple[EditVectors, dict[str, int]]:
    """The vectors with every fact's key and residual clipped at every layer, and how many were."""
    keys, resids, counts = {}, {}, {"keys": 0, "resids": 0}
    for l in vec.layers:
        keys[l], a = clip_rows(vec.keys[l], cfg.clip_key)
        resids[l], b = clip_rows(vec.resids[l], cfg.clip_resid)
        counts["keys"] += a
        counts["resids"] += b
    return EditVectors(vec.zs, keys, resids, vec.base_fingerprint), counts


def _generator(seed: bytes, label: str) -> torch.Generator:
    digest = hashlib.sha256(seed + b"\x1f" + label.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def noisy(stats: dict[int, LayerSums], cfg: DPConfig, seed: bytes, label: str) -> dict[int, LayerSums]:
    """``stats`` plus Gaussian noise (σ_RK on R Kᵀ, σ_KK on K Kᵀ's upper triangle, mirrored)."""
    s_rk, s_kk = cfg.sigmas()
    g = _generator(seed, label)
    out = {}
    for l in sorted(stats):
        st = stats[l]
        rk = st.RK.double() + s_rk * torch.randn(st.RK.shape, generator=g, dtype=torch.float64)
        up = torch.randn(st.KK.shape, generator=g, dtype=torch.float64).triu()
        kk = st.KK.double() + s_kk * (up + up.triu(1).T)
        out[l] = LayerSums(rk, kk, st.n)
    return out


def release(vec: EditVectors | None, layers: list[int], shapes: dict[int, tuple[int, int]], cfg: DPConfig,
            seed: bytes, label: str) -> dict[int, LayerSums]:
    """What a client shares under DP: clipped sums plus noise at every edited layer; a client
    without facts sends noise alone (zeros would tell that it has none)."""
    from fedit.methods.vectors import layer_sums

    stats = layer_sums(clipped(vec, cfg)[0]) if vec is not None and len(vec) else {}
    for l in layers:
        if l not in stats:
            d_out, d_in = shapes[l]
            stats[l] = LayerSums(torch.zeros(d_out, d_in, dtype=torch.float64),
                                 torch.zeros(d_in, d_in, dtype=torch.float64), 0)
    return noisy({l: stats[l] for l in layers}, cfg, seed, label)


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def _log_phi(x: float) -> float:
    """log Φ(x), also far in the lower tail (asymptotic series where Φ underflows)."""
    if x > -30:
        return math.log(_phi(x))
    return -x * x / 2 - math.log(-x) - 0.5 * math.log(2 * math.pi) + math.log1p(-1 / x ** 2 + 3 / x ** 4)


def gdp_delta(mu: float, eps: float) -> float:
    """δ(ε) of μ-Gaussian DP (the second term in log space: e^ε overflows where Φ underflows)."""
    return _phi(-eps / mu + mu / 2) - math.exp(eps + _log_phi(-eps / mu - mu / 2))


def epsilon(mu: float, delta: float) -> float:
    """The smallest ε with δ(ε) ≤ ``delta`` for μ-GDP (bisection; δ(ε) falls with ε)."""
    if gdp_delta(mu, 0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gdp_delta(mu, hi) > delta:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            return math.inf
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gdp_delta(mu, mid) > delta else (lo, mid)
    return hi


def accounting(cfg: DPConfig, layers: int, releases: int = 1) -> dict[str, float]:
    """The guarantee of ``releases`` releases of sums over ``layers`` edited layers, per fact."""
    mu = math.sqrt(2 * layers * releases) / cfg.noise
    s_rk, s_kk = cfg.sigmas()
    return {"mechanism": "Gaussian, per fact (add/remove one fact of one client)", "noise_multiplier": cfg.noise,
            "clip_key": cfg.clip_key, "clip_resid": cfg.clip_resid, "contributors": cfg.contributors,
            "sigma_rk_total": s_rk * math.sqrt(cfg.contributors), "sigma_kk_total": s_kk * math.sqrt(cfg.contributors),
            "layers": layers, "releases": releases, "mu": mu, "delta": cfg.delta, "epsilon": epsilon(mu, cfg.delta)}
