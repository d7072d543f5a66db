"""The closed-form updates, in float64. Shapes are row-major: one row per request.

Shared by ROME, MEMIT, PMET, AlphaEdit and the federated and merging code: MEMIT's solve is
written once (:func:`delta_from_sums`), for the per-fact vectors of one edit and for sums of
many facts alike.
"""

from __future__ import annotations

import torch

from fedit.core.layer_sums import LayerSums


def rome_delta(C: torch.Tensor | None, k_avg: torch.Tensor, k: torch.Tensor, w_k: torch.Tensor,
               v_star: torch.Tensor) -> torch.Tensor:
    """ROME's rank-one update [d_out, d_in].

    u = C⁻¹ k_avg / ‖C⁻¹ k_avg‖ (C = I when ``C`` is None); v = (v* − W k) / (kᵀ u);
    Δ = v uᵀ. Then (W + Δ) k = v* exactly, for the key ``k`` (bare prompt) whose current
    output is ``w_k``.
    """
    k_avg, k, w_k, v_star = (t.double() for t in (k_avg, k, w_k, v_star))
    u = torch.linalg.solve(C.double(), k_avg) if C is not None else k_avg
    u = u / u.norm()
    v = (v_star - w_k) / (k @ u)
    return torch.outer(v, u)


def delta_from_sums(sums: LayerSums, C: torch.Tensor, lam: float, C1: torch.Tensor | None = None) -> torch.Tensor:
    """MEMIT's closed form [d_out, d_in] in float64: Δ = RK (λC + C₁ + KK)⁻¹.

    ``sums`` the facts' R Kᵀ and K Kᵀ, ``C`` [d_in, d_in] the second moment of the keys,
    ``C1`` [d_in, d_in] an extra key covariance (earlier applied edits; None: zero). The
    matrix is symmetric, so Δ = solve(A, RKᵀ)ᵀ.
    """
    A = lam * C.double() + sums.KK
    if C1 is not None:
        A = A + C1.double()
    return torch.linalg.solve(A, sums.RK.T).T


def memit_delta(K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, lam: float,
                KK_extra: torch.Tensor | None = None) -> torch.Tensor:
    """MEMIT's batch update [d_out, d_in]: Δ = Rᵀ K (λC + KᵀK + KK_extra)⁻¹.

    ``K`` [n, d_in] keys, ``R`` [n, d_out] residuals, ``C`` [d_in, d_in] second moment: the
    solve of their sums (:func:`delta_from_sums`).
    """
    return delta_from_sums(LayerSums.of(K, R), C, lam, KK_extra)


def null_space_projector(C: torch.Tensor, threshold: float = 2e-2) -> tuple[torch.Tensor, int]:
    """AlphaEdit's P = Û Ûᵀ [d_in, d_in]: Û the eigenvectors of the second moment ``C`` whose
    eigenvalues are below ``threshold`` (for a symmetric PSD C, its singular vectors and values).

    Keys of preserved knowledge have almost no component in that subspace, so an update
    Δ = Δ P leaves their outputs unchanged. Returns (P in float32, its rank).
    """
    C64 = C.double()
    C64 = (C64 + C64.T) / 2
    vals, vecs = torch.linalg.eigh(C64)
    U = vecs[:, vals < threshold]
    return (U @ U.T).float(), int(U.shape[1])


def alphaedit_delta(K: torch.Tensor, R: torch.Tensor, P: torch.Tensor, alpha: float,
                    KK_prev: torch.Tensor | None = None) -> torch.Tensor:
    """AlphaEdit's projected update [d_out, d_in] (docs/methods.md), in float64:

        Δᵀ = solve(P (KᵀK + K_p K_pᵀ) + α I, P Kᵀ R)

    ``K`` [n, d_in] keys, ``R`` [n, d_out] residuals, ``P`` [d_in, d_in] the null-space
    projector, ``KK_prev`` [d_in, d_in] the running sum of earlier edits' keys K_p K_pᵀ. The
    solution satisfies Δ = Δ P: it lies in the projected space.
    """
    K64, R64, P64 = K.double(), R.double(), P.double()
    A = K64.T @ K64
    if KK_prev is not None:
        A = A + KK_prev.double()
    M = P64 @ A + alpha * torch.eye(A.shape[0], dtype=torch.float64, device=A.device)
    return torch.linalg.solve(M, P64 @ (K64.T @ R64)).T


def rmsnorm_preimage(target: torch.Tensor, gain: torch.Tensor, current: torch.Tensor,
                     ridge: float = 1e-3, iters: int = 100) -> torch.Tensor:
    """Input of an RMSNorm (gain ``g``) whose output comes closest to ``target``.

    An RMSNorm maps x to g ⊙ x / rms(x): its output lies on an ellipsoid, so a target is
    reached only approximately. We solve, per row,

        min_u ‖g ⊙ u − target‖² + ε ‖u − û‖²   subject to  mean(u²) = 1

    (û = current / rms(current); ε = ``ridge`` · mean(g²) keeps coordinates the norm ignores,
    where g ≈ 0, near their current value). The solution is u = (g t + ε û) / (g² + ε + μ)
    with the multiplier μ found by bisection. The returned input is u · rms(current): the same
    scale as before, the least change of the input for that output.
    Shapes: target, current [n, d]; gain [d].
    """
    t, g, x = target.double(), gain.double(), current.double()
    rms = x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
    u0 = x / rms
    eps = ridge * g.pow(2).mean()
    a = g.pow(2) + eps  # [d]
    b = g * t + eps * u0  # [n, d]

    def excess(mu):  # mean(u²) − 1, decreasing in mu on (−min a, ∞)
        return (b / (a + mu)).pow(2).mean(-1, keepdim=True) - 1

    lo = torch.full_like(rms, float(-a.min()) + 1e-12 * float(a.max()))
    hi = torch.full_like(rms, float(a.max()))
    while bool((excess(hi) > 0).any()):
        hi = torch.where(excess(hi) > 0, hi * 2 + 1, hi)
    for _ in range(iters):
        mid = (lo + hi) / 2
        pos = excess(mid) > 0
        lo, hi = torch.where(pos, mid, lo), torch.where(pos, hi, mid)
    u = b / (a + hi)
    return (u * rms).to(current.dtype)
