"""Exporting edits to other formats (PEFT LoRA adapters)."""

from fedit.export.lora import LoraExport, RankTooHighError, export_peft, low_rank_factors

__all__ = ["LoraExport", "RankTooHighError", "export_peft", "low_rank_factors"]
