"""Sweep the edited layers, λ and any other hyperparameter of MEMIT, PMET, AlphaEdit or ROME.

    python benchmarks/sweep_memit.py --n 50 --layers 3-6,4-7,5-8 --lambdas 300,1000,3000 \\
        --target-precision bfloat16 --target-cache ~/.cache/fedit/targets --out out/sweep
    python benchmarks/sweep_memit.py --method alphaedit --n 100 --layers 3-6 \\
        --set nullspace_threshold=0.02,0.1 --set alpha=10,1 --target-cache ~/.cache/fedit/targets --out out/sweep-ae

``--set KEY=V1,V2`` adds a hyperparameter to the grid (values as JSON: numbers, true/false);
AlphaEdit does not use λ (mom2_update_weight), so its grid has no λ axis. ROME has none either and
edits one layer (``--layers 5,4``: one point per layer); its points edit each record alone, as its
paper does (edit, measure, revert, next record):

    python benchmarks/sweep_memit.py --method rome --skip 100 --n 50 --layers 5 \
        --set kl_factor=0.0625,1 --set clamp_norm_factor=4,1 --target-precision bfloat16 --out out/sweep-rome

The unedited model is measured once (kept in <cache>/measurements, so a rerun, or `fedit eval
--fluency-n 0` on the same records, reuses it). Then, for every (layers, λ), the records are edited in one
batch, measured and the edit reverted. The targets z depend only on the last edited layer, so
with ``--target-cache`` every layer set that ends on the same layer, and every λ, reuses the
same z: the sweep costs one target optimisation per distinct last layer plus a solve and a
measurement per point. Each point is written to ``OUT/sweep.json`` as soon as it is done (a
killed sweep keeps what it measured; rerunning with the same settings skips the points already
there, and a folder holding a sweep made with other settings is refused, never overwritten), and
``OUT/sweep.md`` holds the table sorted by score (CounterFact) or efficacy (zsRE).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

SHOWN = {"counterfact": ["score", "efficacy_success", "paraphrase_success", "neighborhood_success", "efficacy_acc",
                         "locality"],
         "zsre": ["efficacy_acc", "paraphrase_acc", "specificity_acc"]}


def _layer_sets(text: str) -> list[list[int]]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.append(list(range(int(lo), int(hi or lo) + 1)))
    return out


def _scales(point: dict) -> str:
    scales = point.get("step_scales")
    return "—" if scales is None else " ".join(f"{s:g}" for s in scales)


def _grid_values(items: list[str]) -> dict[str, list]:
    """``["alpha=10,1", …]`` → {"alpha": [10, 1], …} (each value parsed as JSON, else kept as text)."""
    out: dict[str, list] = {}
    for item in items:
        key, eq, vals = item.partition("=")
        if not eq or not key.strip() or not vals.strip():
            raise ValueError(f"--set {item!r}: expected KEY=V1,V2 (e.g. --set alpha=10,1)")
        parsed = []
        for v in vals.split(","):
            try:
                parsed.append(json.loads(v))
            except ValueError:
                parsed.append(v.strip())
        out[key.strip()] = parsed
    return out


def _value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _point_id(p: dict) -> tuple:
    return tuple(p["layers"]), p["lambda"], tuple(sorted((p.get("set") or {}).items()))


def _markdown(doc: dict) -> str:
    dataset = doc["setup"]["dataset"]
    keys = SHOWN[dataset]
    rows = sorted(doc["points"], key=lambda p: -p["metrics"].get(keys[0], 0))
    extra = sorted({k for p in rows for k in (p.get("set") or {})})
    method = doc["setup"].get("method", "memit")
    skip = doc["setup"].get("skip", 0)
    which = f"records {skip}–{skip + doc['n'] - 1}" if skip else f"{doc['n']} records"
    how = "each record edited alone" if method == "rome" else "one batch"
    lines = [f"# {method} sweep: {doc['model']}, {dataset}, {which}, {how}", "",
             "Unedited: " + ", ".join(f"{k} {100 * doc['pre'][k]:.1f}" for k in keys if k in doc["pre"]), "",
             "| layers | λ | " + "".join(f"{k} | " for k in extra) + " | ".join(keys)
             + " | mean residual left | step scales | s |",
             "|---|---|" + "---|" * (len(extra) + len(keys)) + "---|---|---|"]
    for p in rows:
        m, st = p["metrics"], p.get("set") or {}
        lam = "—" if p["lambda"] is None else f"{p['lambda']:g}"
        lines.append(f"| {p['layers'][0]}–{p['layers'][-1]} | {lam} | " + "".join(f"{_value(st.get(k, '—'))} | " for k in extra)
                     + " | ".join(f"{100 * m[k]:.1f}" if k in m else "—" for k in keys)
                     + f" | {p['residual_left']:.2f} | {_scales(p)} | {p['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="memit", choices=["memit", "pmet", "alphaedit", "rome"])
    ap.add_argument("--dataset", default="counterfact", choices=["counterfact", "zsre"])
    ap.add_argument("--data", default=None, help="dataset file (default: the sample shipped with fedit)")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--skip", type=int, default=0,
                    help="leave out the first K records (a tuning split apart from the records a report uses)")
    ap.add_argument("--layers", default="3-6,4-7,5-8", help="layer ranges, e.g. 3-6,4-7")
    ap.add_argument("--lambdas", default=None,
                    help="values of mom2_update_weight (default 300,1000,3000; AlphaEdit has none)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2",
                    help="another hyperparameter and its values, e.g. alpha=10,1 (repeatable)")
    ap.add_argument("--target-precision", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--target-cache", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--hparams", default=None, help="JSON file of the method's hyperparameters to sweep around")
    ap.add_argument("--corpus", default=None, help="text for second moments (default: shipped WikiText-2 sample)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.method == "alphaedit" and args.lambdas:
        print("error: AlphaEdit does not use λ (mom2_update_weight); sweep its ridge with --set alpha=10,1",
              file=sys.stderr)
        return 2
    if args.method == "rome" and (args.lambdas or any(len(ls) != 1 for ls in _layer_sets(args.layers))):
        print("error: ROME has no λ and edits one layer; pass single layers (--layers 5 or --layers 4,5)",
              file=sys.stderr)
        return 2
    no_lambda = args.method in ("alphaedit", "rome")
    lambdas = [None] if no_lambda else [float(x) for x in (args.lambdas or "300,1000,3000").split(",")]
    try:
        extra = _grid_values(args.set)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if {"layers", "mom2_update_weight", "target_precision"} & set(extra):
        print("error: sweep layers with --layers, λ with --lambdas and give --target-precision once",
              file=sys.stderr)
        return 2

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import fedit
    from fedit.data.loaders import load_records
    from fedit.errors import FeditError
    from fedit.evaluate.runner import (
        EvalConfig,
        aggregate,
        measure,
        measure_unedited,
        record_metrics,
    )
    from fedit.methods import Resources
    from fedit.paths import cache_root

    out = Path(args.out)
    path = out / "sweep.json"
    # everything besides the layers and λ that the points depend on: a rerun adds points only to a
    # sweep made with the same setup, and never overwrites one made with another
    setup = {"model": args.model or fedit.DEFAULT_MODEL, "dataset": args.dataset, "data": args.data,
             "n": args.n, "hparams": json.loads(Path(args.hparams).read_text()) if args.hparams else None,
             "corpus": args.corpus, "target_precision": args.target_precision}
    if args.skip:  # sweeps made before --skip keep their setup
        setup["skip"] = args.skip
    if args.method != "memit":  # MEMIT sweeps made before --method keep their setup, and can be extended
        setup["method"] = args.method
    try:
        doc = json.loads(path.read_text()) if path.exists() else {"setup": setup, "points": []}
    except json.JSONDecodeError as e:
        print(f"error: {path} is not a sweep file ({e}); pass another --out, or move the file away",
              file=sys.stderr)
        return 2
    if not isinstance(doc, dict) or doc.get("setup") != setup:
        old = (doc.get("setup") or {}) if isinstance(doc, dict) else {}
        differ = sorted(k for k in setup if old.get(k) != setup[k])
        print(f"error: {path} holds a sweep made with other settings ({', '.join(differ)}); "
              "pass another --out, or the same settings to add points to it", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    lm = fedit.load_model(setup["model"], device=args.device, cache_dir=args.cache_dir)
    records = load_records(args.dataset, args.data, n=args.skip + args.n)[args.skip:]
    res = Resources(cache_dir=args.cache_dir, corpus=args.corpus, target_cache=args.target_cache)
    doc.update(model=lm.name, n=len(records))  # as resolved (setup holds what was asked for)
    # the unedited model, measured once for every run on these records (<cache>/measurements)
    raw_pre, _, _ = measure_unedited(lm, records, [], EvalConfig(dataset=args.dataset, fluency_records=0),
                                     cache_root(args.cache_dir) / "measurements")
    doc["pre"] = aggregate([record_metrics(r, None, args.dataset) for r in raw_pre])
    done = {_point_id(p) for p in doc["points"]}
    # grouped by last layer, so that the cached z of one layer are used by every point after the first
    sets = [dict(zip(extra, vals)) for vals in itertools.product(*extra.values())]
    grid = sorted(((ls, lam, st) for ls in _layer_sets(args.layers) for lam in lambdas for st in sets),
                  key=lambda g: (g[0][-1], g[0], g[1] or 0.0, sorted(g[2].items())))
    for layers, lam, st in grid:
        if _point_id({"layers": layers, "lambda": lam, "set": st}) in done:
            continue
        t0 = time.perf_counter()
        overrides = {"layers": layers, "target_precision": args.target_precision, **st}
        if lam is not None:
            overrides["mom2_update_weight"] = lam
        # ROME: each record alone (edit, measure, revert); the others: all records in one batch
        batches = [[r] for r in records] if args.method == "rome" else [records]
        raw, results = [], []
        for batch in batches:
            try:
                # dataset records as the dataset gives them, as `fedit eval` edits them (zsRE has
                # records whose new answer is the old one)
                result = fedit.edit(lm, [r.request for r in batch], method=args.method, overrides=overrides,
                                     hparams_file=args.hparams, resources=res, check=False)
            except FeditError as e:  # e.g. a key the method does not have: nothing measured yet
                print(f"error: {e}", file=sys.stderr)
                return 2
            try:
                raw += measure(lm, batch)
            finally:
                result.applied.revert()
            results.append(result)
        result = results[-1]
        norms = result.outcome.diagnostics.get("residual_norms") or [1.0]
        point = {"layers": layers, "lambda": lam, **({"set": st} if st else {}),
                 "metrics": aggregate([record_metrics(r, p, args.dataset) for r, p in zip(raw, raw_pre)]),
                 "residual_left": norms[-1] / norms[0] if norms[0] else 0.0,
                 # 0 for a layer whose update backtracking rejected (it wrote nothing)
                 "step_scales": result.outcome.diagnostics.get("step_scales"),
                 "targets_from_cache": sum(bool(t.get("cached")) for x in results for t in x.outcome.targets),
                 "seconds": time.perf_counter() - t0}
        doc["points"].append(point)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.replace(path)
        keys = SHOWN[args.dataset]
        print(f"layers {layers[0]}-{layers[-1]}" + ("" if lam is None else f" λ {lam:g}")
              + "".join(f" {k} {v}" for k, v in st.items()) + ": "
              + ", ".join(f"{k} {100 * point['metrics'][k]:.1f}" for k in keys if k in point["metrics"])
              + f" ({point['seconds']:.0f} s, {point['targets_from_cache']} targets cached)", flush=True)
    (out / "sweep.md").write_text(_markdown(doc))
    print(_markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
