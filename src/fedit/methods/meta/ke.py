"""KE, KnowledgeEditor (De Cao et al. 2021): a hypernetwork that turns the fine-tuning
gradient of an edit into a weight update, conditioned on the edit itself.

The condition is the text ``"{original answer} >> {new answer} || {prompt}"`` (zsRE's ``cond``
field: input x, original output y, wanted output a), read by a bidirectional LSTM over the
base model's frozen token embeddings; its final states pass a tanh projection to a vector c.
For every edited matrix W [d_out, d_in] a small head maps c to (α_row [d_out], α_col [d_in],
β_row, β_col, η) and the update is

    ΔW = −s · σ(η) · (Ĝ ⊙ softmax(α_row) α_colᵀ + softmax(β_row) β_colᵀ)

with Ĝ the gradient of the edit's NLL w.r.t. W scaled to unit RMS entry (so one setting of
``max_scale`` s fits models whose gradients differ by orders of magnitude; the paper uses the
raw gradient) and the matrices being the paper's rank-one "conditioned parameter" masks.
Training minimises the edit loss (target NLL after the update, on the prompt and its
rephrasing) subject to KL(pre || post) ≤ ``kl_margin`` on unrelated prompts, with a Lagrange
multiplier λ raised by gradient ascent while the constraint is violated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fedit.core.tokens import encode, pad, pad_id
from fedit.deltas import WeightDeltas
from fedit.errors import HparamsError
from fedit.methods import EditOutcome, Method, register
from fedit.methods.meta.archive import load_editor
from fedit.methods.meta.grads import Captured, capture, token_batch


@dataclass
class KeHparams:
    """KE's hypernetwork shape and training settings (De Cao et al.'s defaults where they exist)."""

    layers: list[int] = field(default_factory=list)  # edited MLP output matrices (the last few layers)
    archive: str | None = None  # folder of the trained editor (``fedit train --method ke``)
    lstm_hidden: int = 256  # per direction (paper: 256)
    cond_dim: int = 1024  # condition vector c (paper: 1024)
    head_hidden: int = 128  # hidden width of each per-matrix head (paper: 128)
    max_scale: float = 1.0  # s: bound of the update scale
    lr: float = 3e-4  # Adam step of the hypernetwork (paper: 3e-4)
    kl_margin: float = 1e-3  # the KL constraint (paper's margin_kl_max)
    lambda_lr: float = 1.0  # ascent step of the Lagrange multiplier
    batch_size: int = 1
    max_steps: int = 2000
    checkpoint_every: int = 100
    val_n: int = 20
    grad_clip: float = 100.0

    def __post_init__(self):
        for name in ("lstm_hidden", "cond_dim", "head_hidden", "batch_size", "max_steps", "checkpoint_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise HparamsError(f"KE hyperparameter {name} must be a positive whole number, got {v!r}.",
                                   f"set {name} to e.g. {KeHparams.__dataclass_fields__[name].default}.")
        for name in ("max_scale", "lr", "kl_margin", "lambda_lr", "grad_clip"):
            if not float(getattr(self, name)) > 0:
                raise HparamsError(f"KE hyperparameter {name} must be positive, got {getattr(self, name)!r}.",
                                   "use the values of the shipped hyperparameter file.")


def condition_text(prompt: str, new: str, old: str | None) -> str:
    """KE's condition: original output y, wanted output a, input x (zsRE's ``cond`` layout)."""
    return f"{old or ''} >> {new} || {prompt}"


class KeEditor(nn.Module):
    """Conditioner LSTM + one head per edited matrix."""

    def __init__(self, layers: list[int], d_in: int, d_out: int, emb_dim: int, hp: KeHparams):
        super().__init__()
        self.layers = list(layers)
        self.d_in, self.d_out = d_in, d_out
        self.lstm = nn.LSTM(emb_dim, hp.lstm_hidden, batch_first=True, bidirectional=True)
        self.proj = nn.Linear(2 * hp.lstm_hidden, hp.cond_dim)
        self.heads = nn.ModuleList([nn.Sequential(nn.Linear(hp.cond_dim, hp.head_hidden), nn.Tanh(),
                                                  nn.Linear(hp.head_hidden, 2 * (d_out + d_in) + 1))
                                    for _ in self.layers])
        for h in self.heads:  # start as a small gradient step: α_col ≈ 1, σ(η) ≈ 0.05
            with torch.no_grad():
                h[2].bias[d_out:d_out + d_in].fill_(1.0)
                h[2].bias[-1].fill_(-3.0)
        self.max_scale = float(hp.max_scale)
        self.register_buffer("lam", torch.ones(()))  # Lagrange multiplier of the KL constraint

    def condition(self, emb: torch.Tensor) -> torch.Tensor:
        """c [cond_dim] from the condition's token embeddings [1, T, emb_dim]."""
        emb = F.layer_norm(emb.float(), emb.shape[-1:])
        _, (h, _) = self.lstm(emb)  # h [2, 1, hidden]: final state of each direction
        return torch.tanh(self.proj(torch.cat([h[0, 0], h[1, 0]], -1)))

    def updates(self, cap: Captured, c: torch.Tensor) -> dict[int, torch.Tensor]:
        out = {}
        for i, l in enumerate(self.layers):
            g = cap.gradient(l)  # [d_out, d_in]
            g = g / g.pow(2).mean().sqrt().clamp_min(1e-12)
            ra, ca, rb, cb, eta = self.heads[i](c).split([self.d_out, self.d_in, self.d_out, self.d_in, 1])
            a = ra.softmax(-1)[:, None] * ca[None, :]
            b = rb.softmax(-1)[:, None] * cb[None, :]
            out[l] = -self.max_scale * torch.sigmoid(eta) * (g * a + b)
        return out

    def objective(self, l_edit: torch.Tensor, l_loc: torch.Tensor, hp: KeHparams) -> torch.Tensor:
        return l_edit + self.lam * (l_loc - hp.kl_margin)

    def param_groups(self, hp: KeHparams) -> list[dict]:
        return [{"params": list(self.parameters()), "lr": hp.lr}]

    @torch.no_grad()
    def after_step(self, l_loc: float, hp: KeHparams) -> None:
        """Dual ascent: λ grows while KL exceeds the margin and shrinks (to 0 at least) otherwise."""
        self.lam.copy_((self.lam + hp.lambda_lr * (l_loc - hp.kl_margin)).clamp_min(0.0))


def condition_embeddings(lm, text: str) -> torch.Tensor:
    """The base model's (frozen) input embeddings of ``text`` [1, T, d_model]."""
    ids, _ = pad([encode(lm.tokenizer, text)], pad_id(lm.tokenizer))
    return lm.adapter.embed()(ids.to(lm.device)).detach()


def ke_updates(lm, editor: KeEditor, requests) -> tuple[dict[int, torch.Tensor], list[float]]:
    """Summed KE updates of ``requests`` (each from its own gradient and condition) and each
    request's NLL before the update."""
    total: dict[int, torch.Tensor] = {}
    losses = []
    for r in requests:
        cap = capture(lm, editor.layers, token_batch(lm.tokenizer, [r.filled_prompt], [r.target_new], lm.device))
        c = editor.condition(condition_embeddings(lm, condition_text(r.filled_prompt, r.target_new, r.target_true)))
        for l, d in editor.updates(cap, c).items():
            total[l] = total[l] + d if l in total else d
        losses.append(cap.loss)
    return total, losses


def build_ke(lm, hp: KeHparams) -> KeEditor:
    d_out, d_in = lm.adapter.w_out_dims(hp.layers[0])
    return KeEditor(hp.layers, d_in, d_out, lm.adapter.embed().weight.shape[1], hp).to(lm.device)


def load_ke(lm, hp: KeHparams) -> tuple[KeEditor, dict]:
    tensors, info = load_editor(hp.archive, "ke", lm)
    shape = info["hparams"]
    editor = build_ke(lm, KeHparams(**{k: shape[k] for k in ("layers", "lstm_hidden", "cond_dim", "head_hidden",
                                                              "max_scale")}))
    editor.load_state_dict(tensors)
    return editor.eval(), info


@torch.no_grad()
def compute_ke(lm, requests, hparams: KeHparams, resources=None) -> EditOutcome:
    """KE's update for ``requests`` (one per request, summed), as deltas."""
    t0 = time.perf_counter()
    editor, _ = load_ke(lm, hparams)
    upd, losses = ke_updates(lm, editor, requests)
    deltas = WeightDeltas.from_layers(lm, {l: d.detach() for l, d in upd.items()}, "ke", requests, hparams)
    return EditOutcome(deltas=deltas, seconds=time.perf_counter() - t0, targets=[{"pre_nll": x} for x in losses],
                       diagnostics={"editor_layers": editor.layers, "editor": str(hparams.archive)})


register(Method("ke", KeHparams, compute_ke, family="meta-learning", needs_training=True,
                description="trained hypernetwork (LSTM over the edit) turns the edit's gradient into an update"))
