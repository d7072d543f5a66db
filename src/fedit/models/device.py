"""The one place where fedit chooses a device and a dtype."""

from __future__ import annotations

import torch

from fedit.errors import FeditError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or ``"auto"`` picks the first CUDA device when one is present, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FeditError(f"device {device!r} was asked for but CUDA is not available here.",
                         "pass --device cpu (or leave --device out to choose automatically).")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None = None) -> torch.dtype:
    """Model weights dtype; float32 unless asked. The closed-form solves always run in float64."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise FeditError(f"unknown dtype {dtype!r}.", f"use one of {sorted(set(_DTYPES))}.") from None
