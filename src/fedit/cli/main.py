"""The ``fedit`` command. Only this package configures logging, progress bars and output."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from fedit.errors import FeditError

log = logging.getLogger("fedit.cli")


def _common(p: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        p.add_argument("--model", default=None, help="built-in name (default gemma-3-270m), local folder or hub name")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: CUDA when present)")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    p.add_argument("--cache-dir", default=None, help="cache for models, statistics, templates (default $FEDIT_CACHE or ~/.cache/fedit)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is often faster on a shared machine)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.add_argument("-v", "--verbose", action="store_true")


def _edit_args(p: argparse.ArgumentParser) -> None:
    from fedit.methods import names

    p.add_argument("--method", default="memit", choices=names())
    p.add_argument("--layers", default=None, help="comma-separated layers to edit (overrides the data file)")
    p.add_argument("--hparams", default=None, help="JSON file of hyperparameters (overrides the data file)")
    p.add_argument("--corpus", default=None, help="text file or folder for second moments (default: shipped WikiText-2 sample)")
    precision_arg(p, cache=True)


def precision_arg(p: argparse.ArgumentParser, cache: bool = False) -> None:
    from fedit.methods.hparams import PRECISIONS

    p.add_argument("--target-precision", default=None, choices=PRECISIONS,
                   help="precision of target optimisation (default: the hyperparameter file's, float32); "
                        "bfloat16 is ~1.4x faster on CPUs with AMX and on GPUs")
    if cache:
        p.add_argument("--target-cache", default=None, metavar="DIR",
                       help="keep optimised target vectors in DIR and reuse them (an interrupted run resumes; "
                            "a sweep of λ or of lower layers re-solves without re-optimising)")


def overrides_from(args) -> dict:
    """Hyperparameter overrides given on the command line (None where not given)."""
    return {"layers": _layers(args.layers), "target_precision": getattr(args, "target_precision", None)}


def resources_from(args):
    from fedit.methods import Resources

    return Resources(cache_dir=args.cache_dir, corpus=args.corpus, progress=not args.json,
                     target_cache=getattr(args, "target_cache", None))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fedit", description="Edit the factual knowledge of language models.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("edit", help="edit facts and show what the model says before and after")
    _common(p)
    _edit_args(p)
    p.add_argument("--prompt", help='prompt with {} for the subject, e.g. "{} is located in"')
    p.add_argument("--subject")
    p.add_argument("--target", help="the new answer")
    p.add_argument("--target-true", default=None, help="the current answer (optional)")
    p.add_argument("--requests", help="JSON/JSONL file of requests (instead of --prompt/--subject/--target)")
    p.add_argument("--sequential", type=int, default=0, metavar="B",
                   help="apply the requests in batches of B, one after another (default: one batch)")
    p.add_argument("--save", help="write the edit (deltas + metadata) to this .safetensors file")

    p = sub.add_parser("apply", help="apply a saved edit to a model")
    _common(p)
    p.add_argument("file")
    p.add_argument("--out", help="write the edited model to this folder (loadable with --model)")
    p.add_argument("--force", action="store_true", help="apply even if the base weights differ")

    p = sub.add_parser("revert", help="undo a saved edit on a model that carries it (bit-identical)")
    _common(p)
    p.add_argument("file")
    p.add_argument("--out", help="write the reverted model to this folder")
    p.add_argument("--force", action="store_true", help="revert even if the weights are not exactly base + delta")

    p = sub.add_parser("stats", help="precompute second-moment statistics of keys")
    _common(p)
    p.add_argument("--layers", required=True, help="comma-separated layers")
    p.add_argument("--corpus", default=None, help="text file or folder (default: shipped WikiText-2 sample)")
    p.add_argument("--samples", type=int, default=1000, help="number of corpus chunks")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per chunk")

    p = sub.add_parser("eval", help="edit dataset records and measure the standard metrics before and after")
    _common(p)
    _edit_args(p)
    p.add_argument("--dataset", required=True,
                   help="counterfact, counterfact-easyedit, zsre, mquake, easyedit (known_1000 is for tracing)")
    p.add_argument("--data", default=None, help="dataset file (default: the small sample shipped with fedit)")
    p.add_argument("--n", type=int, default=None, help="use the first N records")
    p.add_argument("--batch-size", type=int, default=None, help="edits per batch (default: all in one batch)")
    p.add_argument("--sequential", action="store_true",
                   help="keep every batch applied (default: revert each batch after measuring it)")
    p.add_argument("--fluency-n", type=int, default=20, help="records generated from for fluency (0: skip)")
    p.add_argument("--final-only", action="store_true",
                   help="with --sequential: measure only at the end (default: also after every batch)")
    p.add_argument("--resume", action="store_true",
                   help="with --sequential: continue the run checkpointed in OUT/checkpoint (written after every batch)")
    p.add_argument("--out", required=True, help="folder for report.json, report.md and chart.png")

    p = sub.add_parser("trace", help="causal tracing: which layers and tokens carry a fact (heat map)")
    _common(p)
    p.add_argument("--prompt", help='prompt with {} for the subject (or spelling it out), e.g. "{} is located in"')
    p.add_argument("--subject")
    p.add_argument("--answer", default=None, help="answer to score (default: the model's own greedy next token)")
    p.add_argument("--dataset", default=None, help="known_1000: trace facts of a dataset and average the maps")
    p.add_argument("--data", default=None, help="dataset file (default: the known_1000 sample shipped with fedit)")
    p.add_argument("--n", type=int, default=20, help="with --dataset: number of facts the model knows to trace")
    p.add_argument("--include-unknown", action="store_true",
                   help="with --dataset: also trace facts whose answer the model does not predict (default: skip them)")
    p.add_argument("--kind", default="all", choices=["hidden", "mlp", "attn", "all"],
                   help="state restored: hidden (residual stream), mlp or attn (windows of outputs), or all three")
    p.add_argument("--window", type=int, default=10, help="layers restored together for mlp/attn (default 10)")
    p.add_argument("--samples", type=int, default=10, help="noise samples per prompt (default 10)")
    p.add_argument("--seed", type=int, default=1, help="seed of the noise (default 1)")
    p.add_argument("--noise", type=float, default=None,
                   help="noise standard deviation (default: 3x the spread of subject-token embeddings)")
    p.add_argument("--noise-data", default=None,
                   help="known_1000-format file whose subjects set the noise level (default: --data, else the shipped sample)")
    p.add_argument("--edit-layers", type=int, default=None,
                   help="how many consecutive layers to recommend for MEMIT-style methods (default: as many as "
                        "the model's MEMIT hyperparameters edit)")
    p.add_argument("--out", required=True, help="PNG file for the heat map(s)")

    p = sub.add_parser("datasets", help="where to get the full dataset files (this tool never downloads them)")
    p.add_argument("kind", nargs="?", default=None)

    p = sub.add_parser("demo", help="edit a few well-known facts in the default model and show before/after, "
                                    "then three organisations editing together (FedEdit)")
    _common(p)
    p.add_argument("--method", default="memit", choices=["rome", "memit"])
    p.add_argument("--no-fed", action="store_true", help="skip the federated part")

    from fedit.cli import fed
    from fedit.cli.collab import register as register_collab

    fed.register(sub, _common)
    register_collab(sub, _common, None)
    return ap


def _layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FeditError(f"--layers {text!r} is not a list of integers.", "write it like --layers 3,4,5") from None


def _load(args):
    from fedit.models.loading import DEFAULT_MODEL, load_model

    return load_model(args.model or DEFAULT_MODEL, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir)


def _emit(args, obj: dict, text: str) -> None:
    if args.json:
        sys.stdout.write(json.dumps(obj) + "\n")
    else:
        sys.stdout.write(text.rstrip() + "\n")


def _table(rows: list[dict]) -> str:
    lines = [f"{'prompt':<58} {'target':<14} {'before p':>9} {'top':<12} {'after p':>9} {'top':<12}"]
    for r in rows:
        b, a = r["before"], r.get("after", r["before"])
        lines.append(f"{r['text'][:58]:<58} {r['target'][:14]:<14} {b['target_prob']:>9.4f} {b['top_token'][:12]!r:<12} "
                     f"{a['target_prob']:>9.4f} {a['top_token'][:12]!r:<12}")
    return "\n".join(lines)


def _probe(lm, rows: list[dict], key: str) -> None:
    from fedit.core.probe import describe

    for r in rows:
        d = describe(lm, r["text"], r["target"])
        r[key] = {"target_prob": d["target_prob"], "top_token": d["top_token"]}


def cmd_edit(args) -> int:
    from fedit.api import combined, sequential_edit
    from fedit.requests import EditRequest, load_requests

    if args.requests:
        if args.prompt or args.subject or args.target:
            raise FeditError("give either --requests FILE or --prompt/--subject/--target, not both.")
        requests = load_requests(args.requests)
    else:
        missing = [f"--{n}" for n in ("prompt", "subject", "target") if getattr(args, n) is None]
        if missing:
            raise FeditError(f"missing {', '.join(missing)}.",
                             'e.g. fedit edit --prompt "{} is located in the city of" --subject "Eiffel Tower" --target Rome')
        requests = [EditRequest.build(args.prompt, args.subject, args.target, args.target_true)]
    lm = _load(args)
    from fedit.core.tokens import validate_for_tokenizer

    validate_for_tokenizer(lm.tokenizer, requests)
    res = resources_from(args)
    overrides = overrides_from(args)
    rows = [{"request": r, "text": r.filled_prompt, "target": r.target_new} for r in requests]
    _probe(lm, rows, "before")
    t0 = time.perf_counter()
    batches = ([requests[i:i + args.sequential] for i in range(0, len(requests), args.sequential)]
               if args.sequential else [requests])
    # one after another, a stateful method's state (AlphaEdit's keys) carried between batches
    results = sequential_edit(lm, batches, method=args.method, overrides=overrides, hparams_file=args.hparams,
                              resources=res)
    seconds = time.perf_counter() - t0
    _probe(lm, rows, "after")
    if args.save:
        combined(lm, results, requests).save(args.save)
    out = {"method": args.method, "model": lm.name, "seconds": round(seconds, 3),
           "requests": [{"prompt": r["request"].prompt, "subject": r["request"].subject, "target": r["target"],
                         "before": r["before"], "after": r["after"]} for r in rows]}
    if args.save:
        out["saved"] = str(args.save)
    text = _table(rows) + f"\n\n{args.method} on {lm.name}: {len(requests)} request(s) in {seconds:.1f} s"
    if args.save:
        text += f"; saved to {args.save}"
    _emit(args, out, text)
    return 0


def _save_model(lm, folder: str, base: dict) -> None:
    from fedit.models.loading import BASE_FILE

    path = Path(folder)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    (path / BASE_FILE).write_text(json.dumps(base, indent=1))


def _file_rows(wd) -> list[dict]:
    from fedit.requests import EditRequest

    reqs = [EditRequest.from_dict(r) for r in wd.requests]
    return [{"request": r, "text": r.filled_prompt, "target": r.target_new} for r in reqs]


def cmd_apply(args) -> int:
    from fedit.memory import load_edit, refuse_saving_memory

    wd = load_edit(args.file)
    refuse_saving_memory(wd, args.out)
    lm = _load(args)
    rows = _file_rows(wd)
    _probe(lm, rows, "before")
    wd.apply(lm.model, check_base=not args.force)
    _probe(lm, rows, "after")
    if args.out:
        _save_model(lm, args.out, lm.identity())
    out = {"file": args.file, "model": lm.name, "method": wd.method, "out": args.out,
           "requests": [{"prompt": r["request"].prompt, "subject": r["request"].subject, "target": r["target"],
                         "before": r["before"], "after": r["after"]} for r in rows]}
    _emit(args, out, _table(rows) + f"\n\napplied {args.file} ({wd.method}) to {lm.name}"
          + (f"; edited model written to {args.out}" if args.out else " (in memory only; pass --out DIR to keep it)"))
    return 0


def cmd_revert(args) -> int:
    from fedit.deltas import revert_file_edit
    from fedit.memory import load_edit, refuse_memory_revert

    wd = load_edit(args.file)
    refuse_memory_revert(wd)
    lm = _load(args)
    rows = _file_rows(wd)
    _probe(lm, rows, "before")
    revert_file_edit(lm.model, wd, force=args.force)
    _probe(lm, rows, "after")
    if args.out:
        _save_model(lm, args.out, lm.identity())
    out = {"file": args.file, "model": lm.name, "out": args.out,
           "requests": [{"prompt": r["request"].prompt, "subject": r["request"].subject, "target": r["target"],
                         "before": r["before"], "after": r["after"]} for r in rows]}
    _emit(args, out, _table(rows) + f"\n\nreverted {args.file} on {lm.name}"
          + (f"; written to {args.out}" if args.out else ""))
    return 0


def cmd_stats(args) -> int:
    from fedit.corpus import open_corpus
    from fedit.stats_cache import second_moments, stats_dir

    layers = _layers(args.layers)
    lm = _load(args)
    for l in layers:
        lm.adapter.check_layer(l)
    corpus = open_corpus(args.corpus)
    t0 = time.perf_counter()
    mom = second_moments(lm, layers, corpus=corpus, samples=args.samples, seq_len=args.seq_len,
                         cache_dir=args.cache_dir, progress=not args.json)
    seconds = time.perf_counter() - t0
    folder = stats_dir(lm, corpus, args.cache_dir)
    out = {"model": lm.name, "layers": layers, "corpus": corpus.id, "samples": args.samples, "seq_len": args.seq_len,
           "seconds": round(seconds, 3), "dir": str(folder),
           "trace": {str(l): float(m.trace()) for l, m in mom.items()}}
    _emit(args, out, f"second moments for layers {layers} of {lm.name} over {corpus.id} "
          f"({args.samples} chunks × {args.seq_len} tokens) in {seconds:.1f} s\ncached in {folder}")
    return 0


def cmd_demo(args) -> int:
    from fedit.cli.demo import run_demo

    return run_demo(args, _load(args), _emit, _table, _probe)


def cmd_eval(args) -> int:
    from fedit.data.loaders import load_records
    from fedit.evaluate.report import write
    from fedit.evaluate.runner import EvalConfig, evaluate
    from fedit.paths import cache_root

    records = load_records(args.dataset, args.data, args.n)
    lm = _load(args)
    from fedit.core.tokens import validate_for_tokenizer

    validate_for_tokenizer(lm.tokenizer, [r.request for r in records])
    cfg = EvalConfig(method=args.method, dataset=args.dataset, batch_size=args.batch_size,
                     sequential=args.sequential, fluency_records=args.fluency_n, track_batches=not args.final_only)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(records), desc=f"{args.method} edits", unit="edit", disable=args.json)
    ckpt = Path(args.out) / "checkpoint"
    report = evaluate(lm, records, cfg, overrides=overrides_from(args), hparams_file=args.hparams,
                      resources=resources_from(args), progress=bar.update, checkpoint_dir=ckpt, resume=args.resume,
                      pre_cache=cache_root(args.cache_dir) / "measurements")
    bar.close()
    files = write(report, args.out)
    if ckpt.exists():
        import shutil

        shutil.rmtree(ckpt)  # the run is complete: its report replaces the checkpoint
    out = {k: report[k] for k in ("method", "dataset", "model", "n", "batch_size", "sequential", "seconds",
                                  "seconds_per_edit", "peak_rss_mb")}
    out.update(metrics=report["metrics"], metrics_pre=report["metrics_pre"], files=files)
    if "per_batch" in report:
        out["per_batch"] = report["per_batch"]
    from fedit.evaluate.report import markdown

    _emit(args, out, markdown(report) + f"\nwritten: {files['json']}, {files['md']}, {files['chart']}")
    return 0


def cmd_fed(args) -> int:
    from fedit.cli.fed import cmd_fed as run

    return run(args, _emit)


def cmd_trace(args) -> int:
    from fedit.core.trace import KINDS
    from fedit.data.loaders import load_records
    from fedit.locate import noise_level, recommend_layers, trace_prompt, trace_records
    from fedit.locate.plot import draw

    kinds = list(KINDS) if args.kind == "all" else [args.kind]
    if args.dataset is None and (args.prompt is None or args.subject is None):
        raise FeditError("give --prompt and --subject, or --dataset known_1000.",
                         'e.g. fedit trace --prompt "The {} is located in the city of" --subject "Eiffel Tower" '
                         "--out trace.png")
    if args.dataset is not None and args.dataset != "known_1000":
        raise FeditError(f"tracing averages over known_1000-format facts, not {args.dataset!r}.",
                         "use --dataset known_1000 (with --data PATH for the full file).")
    if args.n < 1:
        raise FeditError(f"--n {args.n}: trace at least one fact.", "use e.g. --n 20.")
    records = load_records("known_1000", args.data) if args.dataset else None
    lm = _load(args)
    if args.noise is not None:
        level = args.noise
    else:
        src = args.noise_data or (args.data if args.dataset else None)
        subjects = [r.request.subject for r in load_records("known_1000", src)] if src or records else None
        level = noise_level(lm, subjects, cache_dir=args.cache_dir)
    t0 = time.perf_counter()
    out: dict = {"model": lm.name, "kinds": kinds, "samples": args.samples, "window": args.window, "seed": args.seed,
                 "noise_level": level}
    if args.dataset:
        from tqdm.auto import tqdm

        bar = tqdm(total=args.n, desc="tracing facts", unit="fact", disable=args.json)
        res = trace_records(lm, records, args.n, kinds, noise=level, samples=args.samples, window=args.window,
                            seed=args.seed, cache_dir=args.cache_dir, progress=bar.update,
                            known_only=not args.include_unknown)
        bar.close()
        maps = [res["averages"][k] for k in kinds]
        out.update(mode="dataset", n=len(res["facts"]), scanned=res["scanned"], skipped_unknown=res["skipped"],
                   facts=res["facts"], maps={k: m.to_dict() for k, m in zip(kinds, maps)})
        title = f"{lm.name}: causal traces averaged over {len(res['facts'])} known_1000 facts"
    else:
        res = trace_prompt(lm, args.prompt, args.subject, args.answer, kinds, noise=level, samples=args.samples,
                           window=args.window, seed=args.seed)
        maps = [res[k] for k in kinds]
        out.update(mode="prompt", maps={k: m.to_dict() for k, m in zip(kinds, maps)})
        title = f"{lm.name}: {maps[0].prompt!r} -> {maps[0].answer.strip()!r}"
    out["peak"] = {m.kind: m.peak() for m in maps}
    if "mlp" in kinds:
        k = args.edit_layers
        if k is None:
            from fedit.methods import hparams_for

            k = len(hparams_for("memit", lm).layers)
        out["recommendation"] = recommend_layers(maps[kinds.index("mlp")], k)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    out["out"] = str(draw(maps, args.out, title))
    lines = [title, f"clean p = {maps[0].high:.4f}, corrupted p = {maps[0].low:.4f} (noise {level:.3g}, "
             f"{args.samples} samples)"]
    for m in maps:
        pk = out["peak"][m.kind]
        where = pk.get("row") or repr(pk.get("token_text"))
        lines.append(f"{m.kind:>6}: peak indirect effect {pk['effect']:.4f} at {where}, layer {pk['layer']}")
    if "recommendation" in out:
        r = out["recommendation"]
        lines.append(f"recommended edit layers: ROME {r['rome_layer']}, MEMIT {r['memit_layers']} ({r['basis']})")
    lines.append(f"heat map written to {out['out']} in {out['seconds']:.1f} s")
    _emit(args, out, "\n".join(lines))
    return 0


def cmd_datasets(args) -> int:
    from fedit.data.loaders import KINDS, fetch_instructions

    kinds = [args.kind] if args.kind else list(KINDS)
    sys.stdout.write("\n\n".join(f"{k}:\n{fetch_instructions(k)}" for k in kinds) + "\n")
    return 0


def cmd_collab(args) -> int:
    from fedit.cli.collab import run

    return run(args, _load, _layers)


COMMANDS = {"edit": cmd_edit, "apply": cmd_apply, "revert": cmd_revert, "stats": cmd_stats, "demo": cmd_demo,
            "eval": cmd_eval, "trace": cmd_trace, "datasets": cmd_datasets, "fed": cmd_fed, "collab": cmd_collab}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    if getattr(args, "json", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return COMMANDS[args.command](args)
    except FeditError as e:
        if getattr(args, "json", False):
            sys.stdout.write(json.dumps({"error": str(e)}) + "\n")
        sys.stderr.write(f"fedit: error: {e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
