"""What the measuring scripts share: their common flags, the model and the records.

Every script takes ``--model``, ``--device``, ``--threads``, ``--json``, ``--n`` and ``--data``
(default: the sample of the dataset shipped with fedit; ``fedit datasets`` says where to get
the full files), loads the model offline and reads the first ``--n`` records.
"""

from __future__ import annotations

import argparse
import json

# "Today's path" of the speed work: what editing did on main before it, per method. The speed
# switches off, and for MEMIT and ROME the settings their Gemma files shipped then (the files
# now ship the candidate vocabulary and, for MEMIT, 4 context templates instead of 6).
BEFORE = {"memit": {"speedups": False, "vocab_subset": 0, "context_template_length_params": [[10, 5]]},
          "rome": {"speedups": False, "vocab_subset": 0}}


def before(method: str) -> dict:
    """The hyperparameters that restore today's path for ``method`` (see ``BEFORE``)."""
    return dict(BEFORE.get(method, {"speedups": False}))


def before_sets(method: str) -> list[str]:
    """:func:`before` as ``fedit eval --set KEY=VALUE`` arguments."""
    return [f"{k}={json.dumps(v)}" for k, v in before(method).items()]


def parser(doc: str, *, n: int, dataset: bool = True) -> argparse.ArgumentParser:
    """An argument parser described by the first line of ``doc``, with the shared flags."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    if dataset:
        ap.add_argument("--dataset", default="counterfact", help="dataset format (default: counterfact)")
    ap.add_argument("--data", default=None, help="dataset file (default: the sample shipped with fedit)")
    ap.add_argument("--n", type=int, default=n, help=f"records (default {n})")
    ap.add_argument("--model", default=None, help="model name or folder (default: fedit's default model)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    return ap


def load(args: argparse.Namespace) -> tuple:
    """Set the thread count, load the model and read the records: ``(lm, records)``."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import fedit
    from fedit.data.loaders import load_records

    lm = fedit.load_model(args.model or fedit.DEFAULT_MODEL, device=args.device)
    return lm, load_records(getattr(args, "dataset", "counterfact"), args.data, n=args.n)


def target_setup(lm, method: str) -> tuple:
    """The method's shipped hyperparameters, its context templates and its target configuration."""
    from fedit.core.templates import flat
    from fedit.methods import Resources, hparams_for

    hp = hparams_for(method, lm)
    templates = flat(Resources().templates(lm, hp.context_template_length_params))
    return hp, templates, hp.target_config()


def stage_lines(head: str, stages: dict[str, float], ops: dict[str, float]) -> str:
    """A profile for stderr: a head line, the stages that took time, the top operators."""
    return (f"  {head}\n    stages (s, inclusive): " + ", ".join(f"{k} {v}" for k, v in stages.items() if v)
            + "\n    top operators (self s): " + ", ".join(f"{k} {v}" for k, v in ops.items()) + "\n")
