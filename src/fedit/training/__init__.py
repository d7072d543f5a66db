"""Training the editors that need it (MEND, KE, SERAC) on an edit dataset's train split.

    lm = fedit.load_model()
    records = load_records("zsre", "zsre_mend_train-1k.json")
    summary = train_editor(lm, "mend", records, "editors/mend", dataset="zsre", seed=0)

writes ``editors/mend/editor.safetensors`` (load it with ``--editor editors/mend`` or the
hyperparameter ``archive``), ``editor.json`` (what it was trained on, validation per
checkpoint) and ``checkpoints/`` (to resume).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

from fedit.data.records import EvalRecord
from fedit.errors import FeditError
from fedit.training.data import examples, split
from fedit.training.loop import train_loop

log = logging.getLogger(__name__)

TRAINABLE = ("mend", "ke", "serac")


def train_editor(lm, method: str, records: list[EvalRecord], out: str | os.PathLike, dataset: str,
                 seed: int = 0, hparams: Any = None, overrides: dict | None = None, hparams_file=None,
                 resume: bool = False, max_steps: int | None = None, data_info: dict | None = None,
                 progress: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Train ``method``'s editor for ``lm`` on ``records`` (a train split) into folder ``out``.

    A seeded slice of ``hparams.val_n`` records is held out for the validation figure of every
    checkpoint; the rest is trained on. ``max_steps`` overrides the hyperparameter. Returns the
    summary written to ``out/editor.json``. The base model is never changed.
    """
    from fedit.methods import get_method, hparams_for

    if method not in TRAINABLE:
        raise FeditError(f"method {method!r} has nothing to train.", f"train one of {list(TRAINABLE)}.")
    m = get_method(method)
    hp = hparams if hparams is not None else hparams_for(m.name, lm, overrides, hparams_file)
    if max_steps is not None:
        if max_steps < 1:
            raise FeditError(f"--steps {max_steps}: train at least one step.", "use e.g. --steps 2000.")
        hp = dataclasses.replace(hp, max_steps=max_steps)
    train, val = split(examples(records), hp.val_n, seed)
    info = dict(data_info or {"dataset": dataset})
    log.info("%s: %d training and %d validation examples", method, len(train), len(val))
    if method == "serac":
        from fedit.training.serac import SeracTrainer

        trainer = SeracTrainer(lm, hp, train, val, dataset, seed, info)
    else:
        from fedit.training.meta import MetaTrainer

        trainer = MetaTrainer(method, lm, hp, train, val, dataset, seed, info)
    shape = {k: v for k, v in dataclasses.asdict(hp).items() if k not in ("max_steps", "checkpoint_every", "archive")}
    signature = {"method": method, "model": lm.identity()["fingerprint"], "data": info.get("sha256"),
                 "n_records": len(records), "seed": seed, "hparams": shape}
    return train_loop(trainer, out, hp.max_steps, hp.checkpoint_every, signature, resume=resume, progress=progress)


__all__ = ["train_editor", "TRAINABLE"]
