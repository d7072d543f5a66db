"""Training MEND and KE editors: the edit, then the update, then its losses.

One step takes ``batch_size`` training examples, factors the gradient of their target NLL on
the frozen model (:func:`fedit.methods.meta.grads.capture`), asks the editor for the update,
and measures with the update substituted (``functional_call``; the base weights are never
written): the edit loss (target NLL on the edit prompts and their rephrasings) and the
locality loss (KL between the unedited and the edited next-token distributions on the
examples' unrelated prompts). The editor's objective combines them (MEND: weighted sum; KE:
Lagrangian of the KL constraint) and Adam updates the editor.
"""

from __future__ import annotations

import dataclasses
from statistics import mean
from typing import Any

import torch

from fedit.deltas import WeightDeltas
from fedit.evaluate.runner import aggregate, measure, record_metrics
from fedit.methods.meta.grads import all_logprobs, capture, kl_pre_post, mean_nll, substituted, token_batch
from fedit.methods.meta.ke import build_ke, condition_embeddings, condition_text
from fedit.methods.meta.mend import build_mend
from fedit.training.data import Example, step_indices

VAL_KEYS = ("efficacy_acc", "paraphrase_acc", "locality", "specificity_acc", "neighborhood_acc")


class MetaTrainer:
    """Trains a MEND or KE editor for ``lm`` on ``train``, validating on ``val``."""

    def __init__(self, method: str, lm, hp, train: list[Example], val: list[Example], dataset: str, seed: int,
                 data_info: dict):
        self.method, self.lm, self.hp = method, lm, hp
        self.train, self.val, self.dataset, self.seed, self.data_info = train, val, dataset, seed, data_info
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.editor = (build_mend if method == "mend" else build_ke)(lm, hp)
        self.opt = torch.optim.Adam(self.editor.param_groups(hp))
        self._pre = None  # the unedited model's measurements of the validation records

    # --- one step -----------------------------------------------------------------------
    def _updates(self, exs: list[Example], observe: bool) -> tuple[dict[int, torch.Tensor], float]:
        lm, layers = self.lm, self.editor.layers
        if self.method == "mend":
            cap = capture(lm, layers, token_batch(lm.tokenizer, [e.prompt for e in exs], [e.target for e in exs],
                                                  lm.device))
            return self.editor.updates(cap, observe=observe), cap.loss
        total: dict[int, torch.Tensor] = {}
        losses = []
        for e in exs:
            cap = capture(lm, layers, token_batch(lm.tokenizer, [e.prompt], [e.target], lm.device))
            c = self.editor.condition(condition_embeddings(lm, condition_text(e.prompt, e.target, e.target_true)))
            for l, d in self.editor.updates(cap, c).items():
                total[l] = total[l] + d if l in total else d
            losses.append(cap.loss)
        return total, mean(losses)

    def step(self, i: int) -> dict[str, float]:
        lm, hp = self.lm, self.hp
        exs = [self.train[k] for k in step_indices(i, hp.batch_size, len(self.train), self.seed)]
        self.editor.train()
        upd, pre_nll = self._updates(exs, observe=True)
        params = substituted(lm, self.editor.layers, upd)
        prompts = [e.prompt for e in exs] + [p for e in exs for p in e.rephrases]
        answers = [e.target for e in exs] + [e.target for e in exs for _ in e.rephrases]
        l_edit = mean_nll(lm, token_batch(lm.tokenizer, prompts, answers, lm.device), params)
        loc = token_batch(lm.tokenizer, [p for e in exs for p, _ in e.loc], [a for e in exs for _, a in e.loc],
                          lm.device)
        with torch.no_grad():
            pre = all_logprobs(lm, loc)
        l_loc = kl_pre_post(pre, all_logprobs(lm, loc, params))
        loss = self.editor.objective(l_edit, l_loc, hp)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.editor.parameters(), hp.grad_clip)
        self.opt.step()
        self.editor.after_step(float(l_loc.detach()), hp)
        return {"loss": float(loss.detach()), "nll_pre": pre_nll, "nll_post": float(l_edit.detach()),
                "kl": float(l_loc.detach())}

    # --- validation ---------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Edit success and locality on the held-out records, one edit at a time, measured the
        way ``fedit eval`` measures (token accuracy of the target; top-1 agreement on unrelated
        prompts), plus the mean target NLL before and after."""
        lm, recs = self.lm, [e.record for e in self.val]
        if self._pre is None:
            self._pre = measure(lm, recs)
        self.editor.eval()
        per, nll_post = [], []
        for e, r, pre in zip(self.val, recs, self._pre):
            upd, _ = self._updates([e], observe=False)
            wd = WeightDeltas.from_layers(lm, {l: d.detach() for l, d in upd.items()}, self.method)
            with wd.applied(lm.model):
                raw = measure(lm, [r])[0]
            per.append(record_metrics(raw, pre, self.dataset))
            s = raw["rewrite_new"][0]
            nll_post.append(s["nll_sum"] / s["n_tokens"])
        agg = aggregate(per)
        out = {k: round(v, 4) for k, v in agg.items() if k in VAL_KEYS}
        out["nll_pre"] = round(mean(p["rewrite_new"][0]["nll_sum"] / p["rewrite_new"][0]["n_tokens"]
                                    for p in self._pre), 4)
        out["nll_post"] = round(mean(nll_post), 4)
        return out

    # --- state --------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"editor": self.editor.state_dict(), "opt": self.opt.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.editor.load_state_dict(state["editor"])
        self.opt.load_state_dict(state["opt"])

    def editor_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.editor.state_dict().items()}

    def info(self) -> dict[str, Any]:
        return {"model": self.lm.identity(), "hparams": dataclasses.asdict(self.hp),
                "training": {**self.data_info, "seed": self.seed, "n_train": len(self.train),
                             "n_val": len(self.val)}}
