"""Weight edits as PEFT LoRA adapters, factorised exactly.

A ROME edit is a rank-one matrix and a MEMIT edit of n facts has rank at most n in each
layer, so ``ΔW = B A`` with ``B`` [d_out, r] and ``A`` [r, d_in] holds the edit exactly in
r (d_out + d_in) numbers instead of d_out d_in. The factors come from an SVD of ΔW (float64)
cut at its numerical rank (singular values above ``max(d) · eps(dtype) · σ_max``, as
``numpy.linalg.matrix_rank``): what is dropped is below the rounding of the stored delta.
The adapter uses ``lora_alpha = r`` (scaling 1), no dropout, and targets the exact edited
modules, so ``peft.PeftModel.from_pretrained(base, DIR)`` computes ``W x + B A x`` — the
dense edit — and ``disable_adapter()`` gives the base model back.

Where the rank is so high that the factors would not be smaller than the dense matrix,
:func:`export_peft` raises :class:`RankTooHighError` and the dense delta file is the format
to use.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from fedit.deltas import WeightDeltas
from fedit.errors import FeditError
from fedit.extras import require

ADAPTER_WEIGHTS = "adapter_model.safetensors"
EDIT_INFO = "fedit_edit.json"
INFO_FORMAT = "fedit-peft/1"


class RankTooHighError(FeditError):
    """An edit's rank is too high for a low-rank adapter to be smaller than the dense delta."""

    def __init__(self, problem: str, fix: str, ranks: dict[str, int]):
        super().__init__(problem, fix)
        self.ranks = ranks


@dataclass
class LoraExport:
    """What :func:`export_peft` wrote."""

    path: Path
    rank: int  # the adapter's r (the largest numerical rank of any edited matrix)
    ranks: dict[str, int]  # module name -> numerical rank of its ΔW
    target_modules: list[str]
    adapter_numbers: int  # values stored by the adapter
    dense_numbers: int  # values of the dense deltas
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "format": "peft", "rank": self.rank, "ranks": self.ranks,
                "target_modules": self.target_modules, "adapter_numbers": self.adapter_numbers,
                "dense_numbers": self.dense_numbers, "files": self.files}


def numerical_rank(s: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> int:
    """Number of singular values ``s`` (descending) above ``max(shape) · eps(dtype) · s[0]``."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    tol = max(shape) * torch.finfo(dtype).eps * float(s[0])
    return int((s > tol).sum())


def low_rank_factors(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factors of a [d_out, d_in] matrix: ``B [d_out, n] @ A [n, d_in] == delta``, n its numerical rank.

    The SVD runs in float64; the singular values are split evenly between the factors (both
    scaled by sqrt σ); the factors come back in ``delta``'s dtype.
    """
    d64 = delta.detach().to(device="cpu", dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(d64, full_matrices=False)  # [d_out, k], [k], [k, d_in]
    n = numerical_rank(S, tuple(delta.shape), delta.dtype)
    root = S[:n].sqrt()
    return (U[:, :n] * root).to(delta.dtype), (root[:, None] * Vh[:n]).to(delta.dtype)


def _pad(B: torch.Tensor, A: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero columns of B / rows of A up to rank r (one r for every module of an adapter)."""
    n = B.shape[1]
    return (torch.cat([B, B.new_zeros(B.shape[0], r - n)], 1), torch.cat([A, A.new_zeros(r - n, A.shape[1])], 0))


def _module_name(param: str) -> str:
    if not param.endswith(".weight"):
        raise FeditError(f"the edit changes {param!r}, which is not the weight of a linear layer, so it has no "
                         "LoRA form.", "keep this edit as the dense delta file (fedit edit --save FILE).")
    return param[: -len(".weight")]


def _transposed(wd: WeightDeltas) -> bool:
    """True where the edited weights are stored [d_in, d_out] (GPT-2's Conv1D)."""
    from fedit.models.adapters import ARCHITECTURES

    spec = ARCHITECTURES.get(wd.model.get("model_type"))
    return bool(spec and spec.w_out_conv1d)


def export_peft(wd: WeightDeltas, out_dir: str | os.PathLike, base_model: str | None = None) -> LoraExport:
    """Write ``wd`` as a PEFT LoRA adapter folder (``adapter_config.json``, ``adapter_model.safetensors``).

    ``base_model`` is recorded as ``base_model_name_or_path`` (default: the edit's model
    name). Also writes ``fedit_edit.json`` (method, requests, hyperparameters, model identity
    and the rank of each module). Raises :class:`RankTooHighError` (writing nothing) when the
    factors would hold at least as many numbers as the dense deltas.
    """
    peft = require("peft", "peft")
    if not wd.deltas:
        raise FeditError("the edit changes no weights, so there is nothing to export.", "export an edit that did.")
    transposed = _transposed(wd)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    ranks: dict[str, int] = {}
    for pname, d in wd.deltas.items():
        if d.dim() != 2:
            raise FeditError(f"the edit of {pname!r} has shape {tuple(d.shape)}, not a matrix; it has no LoRA form.",
                             "keep this edit as the dense delta file.")
        module = _module_name(pname)
        factors[module] = low_rank_factors(d.T if transposed else d)  # ΔW [d_out, d_in] = B A
        ranks[module] = factors[module][0].shape[1]
    r = max(max(ranks.values()), 1)
    adapter_numbers = sum(r * sum(d.shape) for d in wd.deltas.values())
    dense_numbers = sum(d.numel() for d in wd.deltas.values())
    if adapter_numbers >= dense_numbers:
        raise RankTooHighError(
            f"this {wd.method} edit has rank {r} (per module: {ranks}); a LoRA adapter of that rank holds "
            f"{adapter_numbers:,} numbers, no fewer than the {dense_numbers:,} of the dense deltas.",
            "keep the dense delta file (fedit edit --save FILE.safetensors; fedit apply FILE), or edit fewer "
            "facts per layer.", ranks)
    factors = {m: _pad(B, A, r) for m, (B, A) in factors.items()}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    targets = sorted(factors)
    cfg = peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, bias="none", target_modules=targets,
                          fan_in_fan_out=transposed, task_type="CAUSAL_LM", inference_mode=True,
                          base_model_name_or_path=base_model or wd.model.get("name"))
    cfg.save_pretrained(str(out))
    tensors = {}
    for m, (B, A) in factors.items():
        tensors[f"base_model.model.{m}.lora_A.weight"] = A.contiguous()  # [r, d_in]
        tensors[f"base_model.model.{m}.lora_B.weight"] = B.contiguous()  # [d_out, r]
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    info = {"format": INFO_FORMAT, "method": wd.method, "model": wd.model, "requests": wd.requests,
            "hparams": wd.hparams, "rank": r, "ranks": ranks}
    (out / EDIT_INFO).write_text(json.dumps(info, indent=1))
    return LoraExport(path=out, rank=r, ranks=ranks, target_modules=targets, adapter_numbers=adapter_numbers,
                      dense_numbers=dense_numbers, files=["adapter_config.json", ADAPTER_WEIGHTS, EDIT_INFO])
