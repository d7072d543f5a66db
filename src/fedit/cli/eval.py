"""``fedit eval``: edit dataset records and measure the standard metrics before and after."""

from __future__ import annotations

import shutil
from pathlib import Path

from fedit.cli import common
from fedit.errors import FeditError


def register(sub) -> None:
    from fedit.data.loaders import KINDS
    from fedit.methods import names

    p = common.add_command(sub, "eval", "edit dataset records and measure the standard metrics before and after")
    common.model_flags(p)
    common.edit_flags(p, names())
    p.add_argument("--dataset", required=True,
                   help=f"dataset format: {', '.join(k for k in KINDS if k != 'known_1000')} "
                        "(known_1000 is for tracing); `fedit datasets` says where to get the full files")
    p.add_argument("--data", default=None, help="dataset file (default: the small sample shipped with fedit)")
    p.add_argument("--n", type=int, default=None, help="use the first N records (default: all)")
    p.add_argument("--batch-size", type=int, default=None, help="edits per batch (default: all in one batch)")
    p.add_argument("--sequential", action="store_true",
                   help="keep every batch applied (default: revert each batch after measuring it)")
    p.add_argument("--fluency-n", type=int, default=20, help="records generated from for fluency (0: skip)")
    p.add_argument("--no-generation-success", action="store_true",
                   help="skip the greedy continuations behind generation_success (about half of the "
                        "measuring time; default: measure it)")
    p.add_argument("--final-only", action="store_true",
                   help="with --sequential: measure only at the end (default: also after every batch)")
    p.add_argument("--measure-every", type=int, default=1, metavar="K",
                   help="with --sequential: measure the records edited so far after every K-th batch only "
                        "(and at the end), for a long curve at a fraction of the measuring time (default: 1)")
    p.add_argument("--resume", action="store_true",
                   help="with --sequential: continue the run checkpointed in OUT/checkpoint (written after every batch)")
    p.add_argument("--out", required=True, help="folder for report.json, report.md and chart.png")
    p.set_defaults(run=run)


def run(args) -> int:
    from fedit import progress
    from fedit.core.tokens import validate_for_tokenizer
    from fedit.data.loaders import load_records
    from fedit.evaluate.report import markdown, write
    from fedit.evaluate.runner import EvalConfig, evaluate
    from fedit.paths import cache_root
    from fedit.provenance import data_file

    if args.measure_every < 1:
        raise FeditError(f"--measure-every {args.measure_every}: it must be a positive whole number.",
                         "give --measure-every 1 or more (1: after every batch), or --final-only to measure only at the end.")
    for flag, value in (("--n", args.n), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise FeditError(f"{flag} {value}: it must be a positive whole number.",
                             f"give {flag} 1 or more, or leave it out (default: all).")
    from fedit.atomic import check_writable_folder

    check_writable_folder(args.out)  # the report's folder: a bad one fails now, not after the run
    records = load_records(args.dataset, args.data, args.n)
    common.sets_from(args, args.method)  # refuse a bad --set before loading the model
    lm = common.load(args)
    validate_for_tokenizer(lm.tokenizer, [r.request for r in records], lm.model)
    hp, sources = common.resolve_hparams(args, lm, args.method)
    prov = common.provenance(lm, method=args.method, hparams=hp, sources=sources, data=data_file(args.data, args.dataset))
    cfg = EvalConfig(method=args.method, dataset=args.dataset, batch_size=args.batch_size,
                     sequential=args.sequential, fluency_records=args.fluency_n, track_batches=not args.final_only,
                     track_every=args.measure_every,
                     generation_success=not args.no_generation_success)
    ckpt = Path(args.out) / "checkpoint"
    with progress.task(f"{args.method} edits", total=len(records), unit="edit") as bar:
        report = evaluate(lm, records, cfg, overrides=common.overrides_from(args, args.method),
                          hparams_file=args.hparams, resources=common.resources_from(args), progress=bar.callback(),
                          checkpoint_dir=ckpt, resume=args.resume, pre_cache=cache_root(args.cache_dir) / "measurements")
    report["provenance"] = prov
    files = write(report, args.out)
    if ckpt.exists():
        shutil.rmtree(ckpt)  # the run is complete: its report replaces the checkpoint
    out = {k: report[k] for k in ("method", "dataset", "model", "n", "batch_size", "sequential", "seconds",
                                  "seconds_per_edit", "peak_rss_mb")}
    out.update(metrics=report["metrics"], metrics_pre=report["metrics_pre"], files=files)
    if "per_batch" in report:
        out["per_batch"] = report["per_batch"]
    out["provenance"] = prov
    common.emit(args, out, markdown(report) + f"\nwritten: {files['json']}, {files['md']}, {files['chart']}")
    return 0
