"""Training SERAC's scope classifier (binary cross-entropy on in-scope / out-of-scope pairs).

Every text is embedded once by the frozen MiniLM encoder. A step takes ``batch_size`` edits
plus, for each, its ``hard_negatives`` nearest other training edits (by MiniLM similarity of
their prompts), and scores every input of the batch against every one of those edits.
Positives: an edit's own prompt and its rephrasings (also with the first word of the answer
appended, as teacher-forced probes read them). Negatives: its unrelated (locality) prompts,
and the inputs of every other edit in the batch, the hard ones included. Positives are
weighted so both classes count equally.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from fedit.evaluate.runner import aggregate, measure, record_metrics
from fedit.methods.scope import ScopeClassifier, embed
from fedit.methods.serac_artifact import SeracEdit
from fedit.training.data import Example, step_indices


def _with_answer(prompt: str, answer: str) -> str:
    return f"{prompt} {answer.split()[0]}" if answer.split() else prompt


def _inputs(e: Example) -> tuple[list[str], list[str]]:
    """(in-scope texts, out-of-scope texts) of one example."""
    pos = [e.prompt, _with_answer(e.prompt, e.target)]
    pos += [x for r in e.rephrases for x in (r, _with_answer(r, e.target))]
    neg = [x for p, a in e.loc for x in (p, _with_answer(p, a))]
    return pos, neg


class SeracTrainer:
    method = "serac"

    def __init__(self, lm, hp, train: list[Example], val: list[Example], dataset: str, seed: int, data_info: dict):
        self.lm, self.hp, self.train, self.val = lm, hp, train, val
        self.dataset, self.seed, self.data_info = dataset, seed, data_info
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.clf = ScopeClassifier()
        self.opt = torch.optim.Adam(self.clf.parameters(), lr=hp.lr)
        self.key_emb = embed([e.prompt for e in train])  # [N, d]
        self.inputs = [_inputs(e) for e in train]
        texts = [t for pos, neg in self.inputs for t in pos + neg]
        emb = embed(texts)
        self.in_emb, k = [], 0
        for pos, neg in self.inputs:
            self.in_emb.append((emb[k:k + len(pos)], emb[k + len(pos):k + len(pos) + len(neg)]))
            k += len(pos) + len(neg)
        sim = self.key_emb @ self.key_emb.T
        sim.fill_diagonal_(-2.0)
        self.nearest = sim.topk(min(hp.hard_negatives, len(train) - 1), dim=-1).indices if len(train) > 1 else None
        self._pre = None

    def step(self, i: int) -> dict[str, float]:
        idx = step_indices(i, min(self.hp.batch_size, len(self.train)), len(self.train), self.seed)
        edits = list(dict.fromkeys(idx + ([int(j) for b in idx for j in self.nearest[b]] if self.nearest is not None
                                          else [])))
        col = {e: c for c, e in enumerate(edits)}
        xs, labels = [], []
        for b in dict.fromkeys(idx):
            pos, neg = self.in_emb[b]
            xs += [pos, neg]
            row = torch.zeros(len(edits))
            row[col[b]] = 1.0
            labels += [row.expand(len(pos), -1), torch.zeros(len(neg), len(edits))]
        x, y = torch.cat(xs), torch.cat(labels)
        logits = self.clf(x, self.key_emb[edits])
        n_pos = y.sum().clamp_min(1.0)
        loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=(y.numel() - n_pos) / n_pos)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            acc = ((logits > 0).float() == y).float().mean()
        return {"loss": float(loss.detach()), "pair_acc": float(acc)}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Routing on the held-out edits (all of them in one memory) and, through the model,
        edit success and locality measured as ``fedit eval`` does."""
        val, clf = self.val, self.clf.eval()
        keys = clf.keys(embed([e.prompt for e in val]))
        def routed(texts):  # noqa: E306
            p = torch.sigmoid(clf.logits(clf.keys(embed(texts)), keys))
            v, j = p.max(-1)
            return [(float(a), int(b)) for a, b in zip(v, j)]
        ok_in, n_in, ok_out, n_out = 0, 0, 0, 0
        for k, e in enumerate(val):
            for v, j in routed([e.prompt, *e.rephrases]):
                ok_in += int(v > self.hp.threshold and j == k)
                n_in += 1
            for v, _ in routed([p for p, _ in e.loc]):
                ok_out += int(v <= self.hp.threshold)
                n_out += 1
        self.clf.train()
        out = {"route_in_scope": round(ok_in / max(1, n_in), 4), "route_out_of_scope": round(ok_out / max(1, n_out), 4)}
        recs = [e.record for e in val]
        if self._pre is None:
            self._pre = measure(self.lm, recs)
        edit = SeracEdit(requests=[r.request.to_dict() for r in recs], hparams=dataclasses.asdict(self.hp),
                         model=self.lm.identity(), classifier=self.editor_tensors(), tokenizer=self.lm.tokenizer)
        with edit.applied(self.lm.model):
            post = measure(self.lm, recs)
        agg = aggregate([record_metrics(r, p, self.dataset) for r, p in zip(post, self._pre)])
        out.update({k: round(v, 4) for k, v in agg.items()
                    if k in ("efficacy_acc", "paraphrase_acc", "locality", "specificity_acc", "neighborhood_acc")})
        return out

    def state(self) -> dict[str, Any]:
        return {"clf": self.clf.state_dict(), "opt": self.opt.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.clf.load_state_dict(state["clf"])
        self.opt.load_state_dict(state["opt"])

    def editor_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.clf.state_dict().items()}

    def info(self) -> dict[str, Any]:
        return {"model": self.lm.identity(), "hparams": dataclasses.asdict(self.hp),
                "training": {**self.data_info, "seed": self.seed, "n_train": len(self.train), "n_val": len(self.val)}}
