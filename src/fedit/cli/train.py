"""``fedit train``: train the editor of a method that needs one (MEND, KE, SERAC)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from fedit.errors import FeditError

DATASETS = ("zsre", "counterfact")


def register(sub) -> None:
    from fedit.cli import common
    from fedit.methods import names

    p = common.add_command(sub, "train", "train the editor of a method that needs one (MEND, KE, SERAC) on a "
                                         "dataset's train split")
    common.model_flags(p)
    p.add_argument("--method", required=True, choices=names(needs_training=True),
                   help="the method whose editor to train")
    p.add_argument("--dataset", required=True, choices=DATASETS,
                   help="zsre (zsre_mend_train-1k.json) or counterfact (counterfact-train.json, EasyEdit's split, "
                        "or a file in the ROME schema)")
    p.add_argument("--data", required=True, help="the train split file (`fedit datasets` says where to get it)")
    p.add_argument("--out", required=True, help="folder for the editor (editor.safetensors, editor.json) and checkpoints/")
    p.add_argument("--resume", action="store_true", help="continue the run checkpointed in OUT/checkpoints")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial editor, the held-out split and the batch order")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the hyperparameters' max_steps)")
    p.add_argument("--n", type=int, default=None, help="use the first N records of the file")
    p.add_argument("--layers", default=None, help="MEND/KE: comma-separated layers to edit (default: the last three)")
    p.add_argument("--hparams", default=None, help="JSON file of hyperparameters (overrides the data file)")
    p.set_defaults(run=run)


def _kind(dataset: str, path: str) -> str:
    """The loader format of a train file: zSRE, or CounterFact in EasyEdit's or ROME's schema."""
    if dataset == "zsre":
        return "zsre"
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096)
    except OSError as e:
        raise FeditError(f"cannot read {path} ({e}).", "check the --data path.") from None
    return "counterfact" if '"requested_rewrite"' in head else "counterfact-easyedit"


def run(args) -> int:
    from fedit.cli import common
    from fedit.data.loaders import load_records
    from fedit.training import train_editor
    from fedit.training.data import file_info
    from fedit.training.loop import check_resume

    check_resume(args.out, args.resume)  # before the data, the model and the trainer are loaded
    records = load_records(_kind(args.dataset, args.data), args.data, args.n, skip_invalid=True)  # logged
    lm = common.load(args)
    from tqdm.auto import tqdm

    bar = None

    def progress(done: int, stats: dict) -> None:
        nonlocal bar
        if args.json or args.quiet:
            return
        if bar is None:
            bar = tqdm(total=total, initial=done, desc=f"training {args.method}", unit="step", file=sys.stderr)
        else:
            bar.update(done - bar.n)
        if stats:
            bar.set_postfix({k: f"{v:.3g}" for k, v in stats.items()}, refresh=False)

    from fedit.methods import hparams_for

    hp = hparams_for(args.method, lm, {"layers": common.parse_layers(args.layers)}, args.hparams)
    total = args.steps or hp.max_steps
    t0 = time.perf_counter()
    summary = train_editor(lm, args.method, records, args.out, dataset=args.dataset, seed=args.seed, hparams=hp,
                           resume=args.resume, max_steps=args.steps, progress=progress,
                           data_info=file_info(args.data, args.dataset))
    if bar is not None:
        bar.close()
    tr = summary["training"]
    last = tr["history"][-1] if tr["history"] else {}
    out = {"method": args.method, "model": lm.name, "out": str(Path(args.out)), "steps": tr["steps"],
           "max_steps": tr["max_steps"], "complete": tr["complete"], "seconds": tr["seconds"],
           "this_run_seconds": round(time.perf_counter() - t0, 1), "n_train": tr["n_train"], "n_val": tr["n_val"],
           "validation": last.get("validation"), "history": [{"step": h["step"], "validation": h["validation"]}
                                                             for h in tr["history"]]}
    lines = [f"{args.method} editor for {lm.name}: step {tr['steps']}/{tr['max_steps']} in {tr['seconds']:.0f} s "
             f"({tr['n_train']} training, {tr['n_val']} held-out records)"]
    for h in tr["history"]:
        lines.append(f"  step {h['step']:>6}: " + ", ".join(f"{k} {v:.3f}" for k, v in h["validation"].items()))
    lines.append(f"editor written to {args.out} (use --editor {args.out})")
    if not tr["complete"]:
        lines.append(f"continue with: fedit train ... --out {args.out} --resume")
    common.emit(args, out, "\n".join(lines))
    return 0
