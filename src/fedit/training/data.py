"""Training examples for editors, from the records of an edit dataset's train split.

An example is an edit (prompt with the subject filled in, new target, old target when known),
its rephrasings (same question, other words: should give the new target after the edit) and
unrelated prompts with their answers (locality: should not change). The records are split
once, by a seeded permutation, into the examples trained on and a held-out slice that only
validates; the evaluation files (``zsre_mend_eval.json``, ``counterfact-edit.json``) are never
read here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from fedit.data.records import EvalRecord
from fedit.errors import FeditError


@dataclass(frozen=True)
class Example:
    prompt: str  # subject filled in
    target: str  # the new answer
    target_true: str | None
    rephrases: tuple[str, ...]
    loc: tuple[tuple[str, str], ...]  # (unrelated prompt, its answer)
    record: EvalRecord


def examples(records: list[EvalRecord]) -> list[Example]:
    """Records that have a rephrasing and a locality prompt, as training examples."""
    out = []
    for r in records:
        if not r.paraphrases or not r.neighborhood:
            continue
        out.append(Example(r.request.filled_prompt, r.request.target_new, r.request.target_true,
                           tuple(r.paraphrases), tuple((p.prompt, p.answer) for p in r.neighborhood), r))
    return out


def split(items: list, val_n: int, seed: int) -> tuple[list, list]:
    """(train, held-out validation) by a permutation of ``seed``; at least one item stays for training."""
    if len(items) < 2:
        raise FeditError(f"training needs at least 2 usable records (with a rephrasing and a locality prompt); "
                         f"got {len(items)}.", "give a larger train split (e.g. zsre_mend_train-1k.json).")
    val_n = min(val_n, len(items) - 1)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(items), generator=g).tolist()
    return [items[i] for i in perm[val_n:]], [items[i] for i in perm[:val_n]]


def step_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Indices of the training examples of ``step``: epoch after epoch, each a permutation of
    (seed, epoch), so a run resumed at any step sees exactly the batches it would have seen."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, k = divmod(pos, n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1)
        out.append(int(torch.randperm(n, generator=g)[k]))
    return out


def file_info(path: str | Path | None, dataset: str) -> dict:
    """What the editor was trained on: dataset kind, file name and SHA-256 (no directories)."""
    if path is None:
        return {"dataset": dataset, "file": None, "sha256": None}
    p = Path(path)
    return {"dataset": dataset, "file": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
