"""Target batches in one process with threads against forked one-thread workers, same process.

A measuring script, not a test: it prints figures and asserts nothing about time. It loads the
default model, takes ``--n`` CounterFact requests and optimises their targets with the method's
shipped configuration (``--precision`` for bfloat16 autocast), once per setting of ``--runs``:

* ``threads`` — one process, ``--threads`` threads (what an edit did before ``v_workers``);
* ``workers`` — ``--workers`` forked processes, one thread each, whole batches side by side;
* ``threads+batch=B`` / ``workers+batch=B`` — the same with target batches of B requests.

For each it prints seconds per request, the ratio against the first run, and the largest
relative difference of z against the first run (the workers must give the same targets).

    python benchmarks/bench_workers.py --n 64 --threads 2 --workers 2 --precision bfloat16
    python benchmarks/bench_workers.py --n 64 --threads 1 --runs threads,threads+batch=32 --precision bfloat16
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

from _bench import load, parser, target_setup


def main(argv=None) -> int:
    ap = parser(__doc__, n=64)
    ap.add_argument("--method", default="memit", choices=["memit", "pmet", "alphaedit"])
    ap.add_argument("--workers", type=int, default=2, help="worker processes of the 'workers' runs (default 2)")
    ap.add_argument("--runs", default="threads,workers",
                    help="comma-separated runs, each threads or workers, optionally +batch=B (default threads,workers)")
    ap.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)

    from fedit.core.targets import compute_targets

    lm, records = load(args)
    hp, templates, cfg = target_setup(lm, args.method)
    if args.precision != "float32":
        cfg = dataclasses.replace(cfg, autocast=args.precision)
    reqs = [r.request for r in records]
    rows, first = [], None
    for spec in args.runs.split(","):
        parts = dict(p.split("=", 1) if "=" in p else (p, "") for p in spec.split("+"))
        batch = int(parts.get("batch") or hp.v_batch_size)
        workers = args.workers if "workers" in parts else 1
        t0 = time.perf_counter()
        res = compute_targets(lm, reqs, templates, cfg, batch_size=batch, workers=workers)
        secs = (time.perf_counter() - t0) / len(reqs)
        if first is None:
            first, base = res, secs
        diff = max(float((a.z - b.z).norm() / b.z.norm()) for a, b in zip(res, first))
        row = {"run": spec, "batch": batch, "workers": workers, "threads": args.threads, "s_per_request": round(secs, 3),
               "ratio": round(base / secs, 3), "max_rel_z_diff": diff,
               "mean_steps": sum(r.steps for r in res) / len(res)}
        rows.append(row)
        sys.stderr.write(f"  {spec}: {secs:.2f} s per request ({base / secs:.2f}x the first), "
                         f"max |dz|/|z| {diff:.2e}\n")
    if args.json:
        print(json.dumps({"n": len(reqs), "method": args.method, "precision": args.precision, "runs": rows}))
    else:
        print("| run | batch | workers | s / request | × first | max ‖Δz‖/‖z‖ |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['run']} | {r['batch']} | {r['workers']} | {r['s_per_request']} | {r['ratio']} | "
                  f"{r['max_rel_z_diff']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
