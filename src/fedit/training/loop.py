"""The training loop every trainable editor shares: steps, checkpoints, validation, resume.

A trainer (:class:`MetaTrainer`, :class:`SeracTrainer`) provides ``step(i) -> dict`` (one
optimisation step, the same batch for the same ``i`` whatever happened before),
``validate() -> dict``, ``state() / load_state(d)`` (everything that changes while training),
``editor_tensors()`` and ``info()`` (what the saved editor needs). The loop writes, every
``checkpoint_every`` steps and at the end, ``OUT/checkpoints/step-NNNNNN.pt`` (the last two are
kept) and the editor itself, ``OUT/editor.safetensors`` + ``OUT/editor.json``, so an
interrupted run leaves a usable editor and ``resume=True`` continues from the last checkpoint
with the same result as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from fedit.errors import FeditError
from fedit.methods.meta.archive import save_editor

log = logging.getLogger(__name__)

KEEP = 2


class Trainer(Protocol):
    method: str

    def step(self, i: int) -> dict[str, float]: ...
    def validate(self) -> dict[str, float]: ...
    def state(self) -> dict[str, Any]: ...
    def load_state(self, state: dict[str, Any]) -> None: ...
    def editor_tensors(self) -> dict[str, torch.Tensor]: ...
    def info(self) -> dict[str, Any]: ...


def _checkpoints(folder: Path) -> list[Path]:
    return sorted((folder / "checkpoints").glob("step-*.pt"))


def check_resume(out: str | os.PathLike, resume: bool) -> list[Path]:
    """The checkpoints in ``out``; refuses a resume without any and a fresh run over some.

    Cheap: callers run it before building a trainer (loading data, encoding a memory), so a
    wrong flag is named before any work."""
    out = Path(out)
    found = _checkpoints(out)
    if found and not resume:
        raise FeditError(f"{out} holds checkpoints of an earlier training run.",
                         "pass --resume to continue it, or use another --out folder.")
    if resume and not found:
        raise FeditError(f"--resume: no checkpoint in {out / 'checkpoints'}.",
                         "start the run without --resume, or give the --out folder of the interrupted run.")
    return found


def train_loop(trainer: Trainer, out: str | os.PathLike, max_steps: int, checkpoint_every: int,
               signature: dict[str, Any], resume: bool = False,
               progress: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Run ``trainer`` to ``max_steps`` in ``out``; returns the summary also written to editor.json.

    ``signature`` (method, model, data, seed, hyperparameters) must match the checkpoint's to
    resume; without ``resume`` an existing checkpoint is refused rather than overwritten.
    ``progress(steps_done, last_stats)`` is called after every step (and once on resume).
    """
    out = Path(out)
    found = check_resume(out, resume)
    start, history, seconds = 0, [], 0.0
    if resume:
        ck = torch.load(found[-1], map_location="cpu", weights_only=False)
        if ck["signature"] != signature:
            diff = sorted(k for k in set(ck["signature"]) | set(signature)
                          if ck["signature"].get(k) != signature.get(k))
            raise FeditError(f"the checkpoint in {out} was made with other settings ({', '.join(diff)} differ).",
                             "resume with the same method, model, data, seed and hyperparameters, or use another --out.")
        trainer.load_state(ck["trainer"])
        start, history, seconds = ck["step"], ck["history"], ck["seconds"]
        log.info("resuming %s training at step %d of %d", trainer.method, start, max_steps)
        if progress:
            progress(start, {})
    stats: dict[str, float] = {}
    t0 = time.perf_counter() - seconds
    c0 = time.process_time()
    for i in range(start, max_steps):
        stats = trainer.step(i)
        if progress:
            progress(i + 1, stats)
        if (i + 1) % checkpoint_every == 0 or i + 1 == max_steps:
            val = trainer.validate()
            history.append({"step": i + 1, "seconds": round(time.perf_counter() - t0, 1),
                            "cpu_seconds_this_run": round(time.process_time() - c0, 1), "train": stats,
                            "validation": val})
            log.info("step %d: validation %s", i + 1, val)
            _save(trainer, out, i + 1, history, time.perf_counter() - t0, signature, max_steps)
    if start >= max_steps:
        log.info("the run in %s is already at step %d of %d: nothing to train", out, start, max_steps)
    return json.loads((out / "editor.json").read_text())


def _save(trainer: Trainer, out: Path, step: int, history: list, seconds: float, signature: dict,
          max_steps: int) -> None:
    folder = out / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:06d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "history": history, "seconds": seconds, "signature": signature,
                "trainer": trainer.state()}, tmp)
    os.replace(tmp, path)
    for old in _checkpoints(out)[:-KEEP]:
        old.unlink()
    info = trainer.info()
    info["training"].update(steps=step, max_steps=max_steps, complete=step >= max_steps,
                            seconds=round(seconds, 1), history=history)
    save_editor(out, trainer.method, trainer.editor_tensors(), info)
