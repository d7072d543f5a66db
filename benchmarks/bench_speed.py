"""Whole edits on today's path and with the target speed-ups, same records, one script run.

A measuring script, not a test: it prints figures and asserts nothing about time. It runs
``fedit eval`` twice on the same ``--n`` records with the same options, once with
``--set speedups=false`` ("today": target optimisation without the switches of
``fedit.core.targets.SPEED_SWITCHES``, and for MEMIT and ROME the settings their files shipped
before the speed work, ``_bench.BEFORE``) and once as shipped ("new"), each in its own process
with no target cache, so each optimises every target itself. It prints each run's seconds per
edited fact (``edit_seconds / n``: targets, keys, statistics, solves; measurement excluded),
the ratio, and the success rates beside each other with their differences, so speed and
quality are judged on the same records. Each run's report stays in ``--out``.

    python benchmarks/bench_speed.py --method memit --n 100 --threads 2
    python benchmarks/bench_speed.py --method rome --n 20 --batch-size 1 --threads 2
    python benchmarks/bench_speed.py --method memit --n 100 --target-precision bfloat16
    python benchmarks/bench_speed.py --method wise --dataset zsre --n 10 --batch-size 1 \
        --today-set vocab_subset=0 --new-set vocab_subset=1024

``--order new,today`` runs the new path first (the first run also pays for computing the
second-moment statistics when they are not cached yet; run once beforehand, or compare the
order both ways on a shared machine). Anything after ``--`` is passed to both runs; ``--new-set
KEY=VALUE`` sets a hyperparameter of the new run only (a lever that changes z, such as
``vocab_subset=1024``, whose quality the side-by-side rates then show). ``--today-set`` replaces
what "today" means (default ``_bench.BEFORE``) for methods without the speedups switch (GRACE, WISE).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _bench import before_sets

RATES = [("efficacy_success", "ES"), ("paraphrase_success", "PS"), ("neighborhood_success", "NS"),
         ("efficacy_acc", "efficacy acc"), ("paraphrase_acc", "paraphrase acc"), ("neighborhood_acc", "specificity"),
         ("locality", "locality")]


def _run(name: str, args, extra: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "fedit", "eval", "--method", args.method, "--dataset", args.dataset,
           "--n", str(args.n), "--out", str(out / name), "--fluency-n", "0", "--no-generation-success", "-q"]
    if args.data:
        cmd += ["--data", args.data]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.target_precision:
        cmd += ["--target-precision", args.target_precision]
    for kv in (args.today_set or before_sets(args.method)) if name == "today" else args.new_set:
        cmd += ["--set", kv]
    cmd += extra
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[1:])}\n")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    report = json.loads((out / name / "report.json").read_text())
    report["wall_seconds"] = wall
    return report


def _rates(report: dict) -> dict:
    m = report["metrics"]
    return {label: 100 * m[key] for key, label in RATES if isinstance(m.get(key), (int, float))}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="memit", choices=["memit", "rome", "pmet", "alphaedit", "grace", "wise",
                                                            "ft-l", "ft-m"])
    ap.add_argument("--dataset", default="counterfact")
    ap.add_argument("--data", default=None, help="dataset file (default: the sample shipped with fedit)")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=None, help="edits per batch (default: all in one)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--target-precision", default=None, choices=["float32", "bfloat16"])
    ap.add_argument("--new-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a hyperparameter of the new run only (e.g. vocab_subset=1024); repeatable")
    ap.add_argument("--today-set", action="append", default=[], metavar="KEY=VALUE",
                    help="what the baseline run sets instead of speedups=false (for methods without that "
                         "switch, e.g. vocab_subset=0 for GRACE and WISE); repeatable")
    ap.add_argument("--order", default="today,new", help="which path runs first (default today,new)")
    ap.add_argument("--out", default="bench-speed", help="folder for both runs' reports and speed.json")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = ap.parse_args(argv)
    order = args.order.split(",")
    if sorted(order) != ["new", "today"]:
        ap.error("--order takes today,new or new,today")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reports = {name: _run(name, args, extra, out) for name in order}
    per_fact = {k: r["edit_seconds"] / r["n"] for k, r in reports.items()}
    rates = {k: _rates(r) for k, r in reports.items()}
    res = {"method": args.method, "n": args.n, "batch_size": args.batch_size, "threads": args.threads,
           "new_set": args.new_set, "today_set": args.today_set or before_sets(args.method),
           "target_precision": args.target_precision or "float32", "order": order, "cpus": os.cpu_count(),
           "load_average": list(os.getloadavg()),
           "seconds_per_fact": {k: round(v, 3) for k, v in per_fact.items()},
           "target_share": {k: r.get("target_seconds_share") for k, r in reports.items()},
           "peak_rss_mb": {k: r.get("peak_rss_mb") for k, r in reports.items()},
           "speedup": round(per_fact["today"] / per_fact["new"], 3), "rates": rates,
           "rate_differences": {k: round(rates["new"][k] - rates["today"][k], 2) for k in rates["today"]
                                if k in rates["new"]}}
    (out / "speed.json").write_text(json.dumps(res, indent=1))
    lines = [f"{args.method}, {args.n} records, batch {args.batch_size or args.n}, "
             f"{res['target_precision']} targets, {args.threads or 'default'} threads:"]
    for k in ("today", "new"):
        r = rates[k]
        lines.append(f"  {k:5s}: {per_fact[k]:7.2f} s per fact (targets {100 * (res['target_share'][k] or 0):.0f} %), "
                     + " / ".join(f"{label} {r[label]:.1f}" for label in
                                  (("ES", "PS", "NS") if "ES" in r and args.dataset != "zsre" else
                                   ("efficacy acc", "paraphrase acc", "locality")) if label in r))
    lines.append(f"  speed-up {res['speedup']:.2f}x; new - today: "
                 + ", ".join(f"{k} {v:+.1f}" for k, v in res["rate_differences"].items()))
    sys.stderr.write("\n".join(lines) + "\n")
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
