"""The one layer that knows module paths of model architectures.

Editing code asks an adapter for "block i", "the edited matrix of layer i", "the final norm",
"the unembedding"; it never spells ``transformer.h.{i}.mlp.c_proj``. Adding an architecture
means adding one :class:`ArchSpec` here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedit.core.solve import rmsnorm_preimage
from fedit.errors import ModelError


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one family of architectures (relative paths are inside a block)."""

    blocks: str  # ModuleList of decoder blocks
    body: str  # the base model (returns last_hidden_state after the final norm)
    w_out: str  # edited matrix: the MLP output projection, relative to a block
    mlp: str  # the whole MLP, relative to a block
    attn: str  # the attention module, relative to a block
    final_norm: str
    w_out_conv1d: bool = False  # GPT-2 Conv1D stores weight as [in, out]
    # Norm applied to the MLP output before the residual add (Gemma 2/3). When set, the
    # residual stream is not a plain sum of W_out outputs and targets must be carried back
    # through this norm (see ModelAdapter.residual_to_w_out).
    mlp_out_norm: str | None = None
    attn_out_norm: str | None = None


_GPT2 = ArchSpec(blocks="transformer.h", body="transformer", w_out="mlp.c_proj", mlp="mlp", attn="attn",
                 final_norm="transformer.ln_f",
                 w_out_conv1d=True)
_GPTJ = ArchSpec(blocks="transformer.h", body="transformer", w_out="mlp.fc_out", mlp="mlp", attn="attn",
                 final_norm="transformer.ln_f")
_NEOX = ArchSpec(blocks="gpt_neox.layers", body="gpt_neox", w_out="mlp.dense_4h_to_h", mlp="mlp",
                 attn="attention", final_norm="gpt_neox.final_layer_norm")
_LLAMA = ArchSpec(blocks="model.layers", body="model", w_out="mlp.down_proj", mlp="mlp", attn="self_attn",
                  final_norm="model.norm")
_GEMMA2 = ArchSpec(blocks="model.layers", body="model", w_out="mlp.down_proj", mlp="mlp", attn="self_attn",
                   final_norm="model.norm",
                   mlp_out_norm="post_feedforward_layernorm", attn_out_norm="post_attention_layernorm")

ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": _GPT2,
    "gptj": _GPTJ,
    "gpt_neox": _NEOX,
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "mistral": _LLAMA,
    "gemma": _LLAMA,  # Gemma 1 has no post-MLP norm
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
}


def _get(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


class ModelAdapter:
    """Canonical access to a causal LM's parts. Holds no state besides the model."""

    def __init__(self, model: nn.Module):
        model_type = getattr(model.config, "model_type", None)
        if model_type not in ARCHITECTURES:
            raise ModelError(
                f"model type {model_type!r} is not supported for editing.",
                f"use one of {sorted(ARCHITECTURES)} (GPT-2, GPT-J, GPT-NeoX, Llama/Qwen2/Mistral, Gemma 2/3 "
                "text models), or add an ArchSpec in fedit/models/adapters.py.",
            )
        self.model = model
        self.model_type: str = model_type
        self.spec = ARCHITECTURES[model_type]
        self.n_layers: int = len(_get(model, self.spec.blocks))

    # --- names -----------------------------------------------------------------------
    def block_name(self, layer: int) -> str:
        self.check_layer(layer)
        return f"{self.spec.blocks}.{layer}"

    def body_name(self) -> str:
        """The base model (embeddings, blocks, final norm; returns ``last_hidden_state``)."""
        return self.spec.body

    def w_out_name(self, layer: int) -> str:
        return f"{self.block_name(layer)}.{self.spec.w_out}"

    def w_out_param_name(self, layer: int) -> str:
        return f"{self.w_out_name(layer)}.weight"

    def mlp_name(self, layer: int) -> str:
        return f"{self.block_name(layer)}.{self.spec.mlp}"

    def attn_name(self, layer: int) -> str:
        return f"{self.block_name(layer)}.{self.spec.attn}"

    def attn_out_name(self, layer: int) -> str:
        """The module whose output is what attention adds to the residual stream.

        The attention module itself, or the norm after it where there is one (Gemma 2/3:
        ``post_attention_layernorm``). Causal tracing restores this output.
        """
        part = self.spec.attn_out_norm or self.spec.attn
        return f"{self.block_name(layer)}.{part}"

    def mlp_out_name(self, layer: int) -> str:
        """The module whose output is what the MLP adds to the residual stream.

        The MLP itself, or the norm after it (Gemma 2/3: ``post_feedforward_layernorm``).
        """
        part = self.spec.mlp_out_norm or self.spec.mlp
        return f"{self.block_name(layer)}.{part}"

    # --- modules ---------------------------------------------------------------------
    def module(self, name: str) -> nn.Module:
        return _get(self.model, name)

    def blocks(self) -> nn.ModuleList:
        return _get(self.model, self.spec.blocks)

    def block(self, layer: int) -> nn.Module:
        return self.module(self.block_name(layer))

    def w_out(self, layer: int) -> nn.Module:
        return self.module(self.w_out_name(layer))

    def body(self) -> nn.Module:
        return _get(self.model, self.spec.body)

    def final_norm(self) -> nn.Module:
        return _get(self.model, self.spec.final_norm)

    def embed(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def unembed(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def mlp_out_norm(self, layer: int) -> nn.Module | None:
        if self.spec.mlp_out_norm is None:
            return None
        return self.module(f"{self.block_name(layer)}.{self.spec.mlp_out_norm}")

    def check_layer(self, layer: int) -> None:
        if not 0 <= int(layer) < self.n_layers:
            raise ModelError(f"layer {layer} does not exist; the model has layers 0..{self.n_layers - 1}.",
                             "pick layers inside that range (--layers).")

    # --- the edited matrix, always seen as [d_out, d_in] ---------------------------------
    def w_out_matrix(self, layer: int) -> torch.Tensor:
        """A [d_out, d_in] view of the edited weight (GPT-2's Conv1D is stored [d_in, d_out])."""
        w = self.w_out(layer).weight
        return w.T if self.spec.w_out_conv1d else w

    def to_param_layout(self, delta_out_in: torch.Tensor) -> torch.Tensor:
        """Turn a [d_out, d_in] update into the stored layout of the edited weight."""
        return delta_out_in.T.contiguous() if self.spec.w_out_conv1d else delta_out_in

    def w_out_dims(self, layer: int) -> tuple[int, int]:
        d_out, d_in = self.w_out_matrix(layer).shape
        return int(d_out), int(d_in)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size if hasattr(self.model.config, "hidden_size")
                   else self.model.config.n_embd)

    # --- logits at chosen positions ---------------------------------------------------
    def logits(self, final_hidden: torch.Tensor, weight: torch.Tensor | None = None,
               vocab: torch.Tensor | None = None) -> torch.Tensor:
        """Unembed hidden states that have passed the final norm ([..., d_model] -> [..., vocab]).

        ``weight``: a copy of the unembedding matrix to use instead (e.g. one already cast to
        the precision of an autocast region, so it is not cast again on every call).
        ``vocab``: token ids; only their logits are formed ([..., len(vocab)]), with ``weight``
        (if given) already holding just those rows.
        """
        if weight is None and vocab is None:
            logits = self.unembed()(final_hidden)
        else:
            bias = getattr(self.unembed(), "bias", None)
            if weight is None:
                weight = self.unembed().weight[vocab]
            if bias is not None and vocab is not None:
                bias = bias[vocab]
            logits = torch.nn.functional.linear(final_hidden.to(weight.dtype), weight,
                                                None if bias is None else bias.to(weight.dtype))
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # --- residual space -> W_out output space -------------------------------------------
    def residual_to_w_out(self, layer: int, resid: torch.Tensor, w_out_output: torch.Tensor) -> torch.Tensor:
        """Change of W_out's output that moves the residual stream by ``resid``.

        ``resid`` and ``w_out_output`` are [n, d_model] (the current W_out output at the same
        positions). Where the MLP output goes straight into the residual stream this is the
        identity. Where a norm sits between (Gemma 2/3: RMSNorm with gain g), the residual
        moves by norm(o') − norm(o); we take the o' whose norm output comes closest to
        norm(o) + resid at the current scale of o (``solve.rmsnorm_preimage``), i.e. we invert
        the RMSNorm at the current scale.
        """
        norm = self.mlp_out_norm(layer)
        if norm is None:
            return resid
        o = w_out_output.float()
        with torch.no_grad():
            gain = norm(torch.ones(1, o.shape[-1], dtype=norm.weight.dtype, device=o.device)).float()[0]
            n = norm(w_out_output).float()
        new_o = rmsnorm_preimage(n + resid.float(), gain, o)
        return (new_o - o).to(resid.dtype)
