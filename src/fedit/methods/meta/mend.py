"""MEND (Mitchell et al. 2021): a learned map from an edit's gradient to a weight update.

For each edited matrix W [d_out, d_in] (the MLP output projections of the last layers) the
gradient of one token's loss is rank one, ``δ uᵀ``. The editor normalises u and δ (running
statistics per layer, gathered while training), passes their concatenation through an MLP of
low-rank residual layers (identity at initialisation; a learned scale and shift per edited
layer, the MLP itself shared because every edited matrix has the same shape), splits the
result into (ũ, δ̃) and updates ``W ← W − α_l Σ_tokens δ̃ ũᵀ`` with a learned step α_l per layer.
Training (``fedit train --method mend``) minimises ``c_edit · L_edit + c_loc · L_loc``: the NLL
of the target after the update on the edit prompt and its rephrasing, and the KL between the
pre- and post-edit next-token distributions on unrelated prompts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from fedit.deltas import WeightDeltas
from fedit.errors import HparamsError
from fedit.methods import EditOutcome, Method, register
from fedit.methods.meta.archive import load_editor
from fedit.methods.meta.grads import Captured, capture, token_batch


@dataclass
class MendHparams:
    """MEND's editor shape and training settings (EasyEdit's names where they exist)."""

    layers: list[int] = field(default_factory=list)  # edited MLP output matrices (the last few layers)
    archive: str | None = None  # folder of the trained editor (``fedit train --method mend``)
    rank: int = 1920  # rank of each low-rank residual layer (EasyEdit: 1920)
    n_hidden: int = 1  # residual layers with a ReLU before the last, linear one
    edit_lr: float = 1e-4  # initial step α of every layer (learned)
    lr: float = 1e-4  # Adam step of the editor MLP (EasyEdit: 1e-6 over ~100k GPU steps)
    lr_lr: float = 1e-4  # Adam step of the per-layer α
    cedit: float = 0.1  # weight of the edit loss
    cloc: float = 1.0  # weight of the locality (KL) loss
    batch_size: int = 1  # edits per training step
    max_steps: int = 2000
    checkpoint_every: int = 100  # steps between checkpoints (each with a validation figure)
    val_n: int = 20  # records of the training file held out for validation
    grad_clip: float = 100.0

    def __post_init__(self):
        for name in ("rank", "n_hidden", "batch_size", "max_steps", "checkpoint_every", "val_n"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (0 if name in ("n_hidden", "val_n") else 1):
                raise HparamsError(f"MEND hyperparameter {name} must be a positive whole number, got {v!r}.",
                                   f"set {name} to e.g. {MendHparams.__dataclass_fields__[name].default}.")
        for name in ("edit_lr", "lr", "lr_lr", "cedit", "cloc", "grad_clip"):
            if not float(getattr(self, name)) > 0:
                raise HparamsError(f"MEND hyperparameter {name} must be positive, got {getattr(self, name)!r}.",
                                   "use the values of the shipped hyperparameter file.")


class LowRankResidual(nn.Module):
    """``x' = x·s_m + b_m``; ``y = x' + act(U V x' + c)``: identity at start (U = 0)."""

    def __init__(self, dim: int, rank: int, n_modes: int, relu: bool):
        super().__init__()
        rank = min(rank, dim)
        self.v = nn.Parameter(nn.init.xavier_uniform_(torch.empty(rank, dim)))
        self.u = nn.Parameter(torch.zeros(dim, rank))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.mode_scale = nn.Parameter(torch.ones(n_modes, dim))
        self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))
        self.relu = relu

    def forward(self, x: torch.Tensor, mode: int) -> torch.Tensor:  # x [N, dim]
        x = x * self.mode_scale[mode] + self.mode_shift[mode]
        h = (x @ self.v.T) @ self.u.T + self.bias
        return x + (torch.relu(h) if self.relu else h)


class RunningNorm(nn.Module):
    """Per-feature running mean and standard deviation (Chan's parallel update), as buffers."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:  # x [N, dim]
        if x.shape[0] == 0:
            return
        x = x.double()
        n_b, mean_b = x.shape[0], x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        n = self.count + n_b
        d = mean_b - self.mean
        self.mean += d * n_b / n
        self.m2 += m2_b + d ** 2 * self.count * n_b / n
        self.count.fill_(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.count < 2:
            return x
        std = (self.m2 / (self.count - 1)).sqrt().float()
        return (x - self.mean.float()) / (std + 1e-7)


class MendEditor(nn.Module):
    """The gradient transform of all edited layers (one shared MLP, one mode per layer)."""

    def __init__(self, layers: list[int], d_in: int, d_out: int, hp: MendHparams):
        super().__init__()
        self.layers = list(layers)
        self.d_in, self.d_out = d_in, d_out
        dim = d_in + d_out
        n = len(self.layers)
        self.mlp = nn.ModuleList([LowRankResidual(dim, hp.rank, n, relu=i < hp.n_hidden)
                                  for i in range(hp.n_hidden + 1)])
        self.edit_lrs = nn.Parameter(torch.full((n,), float(hp.edit_lr)))
        self.norm_u = nn.ModuleList([RunningNorm(d_in) for _ in range(n)])
        self.norm_d = nn.ModuleList([RunningNorm(d_out) for _ in range(n)])

    def updates(self, cap: Captured, observe: bool = False) -> dict[int, torch.Tensor]:
        """ΔW [d_out, d_in] per edited layer from the captured gradient factors."""
        out = {}
        for i, l in enumerate(self.layers):
            u, d = cap.u[l], cap.delta[l]  # [N, d_in], [N, d_out]
            if observe:
                self.norm_u[i].observe(u)
                self.norm_d[i].observe(d)
            z = torch.cat([self.norm_u[i](u), self.norm_d[i](d)], -1)
            for layer in self.mlp:
                z = layer(z, i)
            u2, d2 = z.split([self.d_in, self.d_out], -1)
            out[l] = -self.edit_lrs[i] * (d2.T @ u2)  # [d_out, d_in]
        return out

    def objective(self, l_edit: torch.Tensor, l_loc: torch.Tensor, hp: MendHparams) -> torch.Tensor:
        return hp.cedit * l_edit + hp.cloc * l_loc

    def param_groups(self, hp: MendHparams) -> list[dict]:
        rest = [p for n, p in self.named_parameters() if n != "edit_lrs"]
        return [{"params": rest, "lr": hp.lr}, {"params": [self.edit_lrs], "lr": hp.lr_lr}]

    def after_step(self, l_loc: float, hp: MendHparams) -> None:
        """Nothing to update outside the optimiser (KE moves its Lagrange multiplier here)."""


def build_mend(lm, hp: MendHparams) -> MendEditor:
    d_out, d_in = lm.adapter.w_out_dims(hp.layers[0])
    return MendEditor(hp.layers, d_in, d_out, hp).to(lm.device)


def load_mend(lm, hp: MendHparams) -> tuple[MendEditor, dict]:
    """The trained editor of ``hp.archive`` for ``lm`` (its layers and shape come from the archive)."""
    tensors, info = load_editor(hp.archive, "mend", lm)
    shape = {**info["hparams"]}
    editor = build_mend(lm, MendHparams(**{k: shape[k] for k in ("layers", "rank", "n_hidden")}))
    editor.load_state_dict(tensors)
    return editor.eval(), info


@torch.no_grad()
def compute_mend(lm, requests, hparams: MendHparams, resources=None) -> EditOutcome:
    """One MEND update for all ``requests`` (their gradients summed over tokens), as deltas."""
    t0 = time.perf_counter()
    editor, info = load_mend(lm, hparams)
    batch = token_batch(lm.tokenizer, [r.filled_prompt for r in requests], [r.target_new for r in requests],
                        lm.device)
    cap = capture(lm, editor.layers, batch)
    upd = {l: d.detach() for l, d in editor.updates(cap).items()}
    deltas = WeightDeltas.from_layers(lm, upd, "mend", requests, hparams)
    return EditOutcome(deltas=deltas, seconds=time.perf_counter() - t0,
                       targets=[{"pre_nll": cap.loss}], diagnostics={"editor_layers": editor.layers,
                                                                     "editor": str(hparams.archive)})


register(Method("mend", MendHparams, compute_mend, family="meta-learning", needs_training=True,
                description="trained hypernetwork maps the edit's rank-one gradients to an update of the last MLP layers"))
