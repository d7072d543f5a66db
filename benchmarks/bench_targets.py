"""Target optimisation on today's path and with the speed switches on, same process.

A measuring script, not a test: it prints figures and asserts nothing about time. It loads the
default model (Gemma 3 270M, offline), takes ``--n`` CounterFact requests (the sample shipped
with fedit unless ``--data`` names a file) and optimises their targets with the method's
shipped configuration twice: "old", today's path with the speed switches of
:class:`fedit.core.targets.TargetConfig` off (``drop_stopped``: a request that reached
``nll_stop`` leaves the batch; ``reuse_prefix``: the upper blocks run only the columns δ
reaches), and "new", with them on (the default). ``--lever`` turns off one switch only;
``--precision``/``--new-precision`` set the targets' precision (bfloat16 autocast). ``--repeats``
alternates the two (old, new, new, old, ...) and keeps each one's fastest run. Reported:
seconds per request for each and their ratio (printed to stderr as soon as known), each target's steps, final NLL and target
probability exp(−NLL) under both (quality check), the largest |z_new − z_old| / |z_old|, and a
stage profile of one more batch (``--profile-n`` requests, torch.profiler): the first full
forward pass, the upper blocks' forward, the vocabulary projection with its log-softmax, the KL
term, the backward pass, and the operators that took the most time.

    python benchmarks/bench_targets.py --n 8 --threads 1
    python benchmarks/bench_targets.py --n 8 --threads 1 --nll-stop 0.5 --profile-n 0
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time

from _bench import load, parser, stage_lines, target_setup

from fedit.core.targets import SPEED_SWITCHES as SWITCHES  # off = the path before them
STAGES = ["targets.first_forward", "targets.upper_forward", "targets.projection", "targets.kl", "targets.backward"]


def _profile(run) -> dict:
    """Run ``run()`` under torch.profiler; seconds per labelled stage and the top operators."""
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    total = time.perf_counter() - t0
    ev = prof.key_averages()
    stages = {e.key: e.cpu_time_total / 1e6 for e in ev if e.key in STAGES}
    ops = sorted((e for e in ev if not e.key.startswith("targets.")), key=lambda e: -e.self_cpu_time_total)[:10]
    return {"total_s": round(total, 2), "stages_s": {k: round(stages.get(k, 0.0), 2) for k in STAGES},
            "top_ops_self_s": {e.key: round(e.self_cpu_time_total / 1e6, 2) for e in ops}}


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, n=8, dataset=False)
    ap.add_argument("--method", default="memit", choices=["memit", "rome", "pmet", "alphaedit"])
    ap.add_argument("--batch", type=int, default=None, help="target batch size (default: the method's v_batch_size)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each loop, alternating (fastest counts)")
    ap.add_argument("--profile-n", type=int, default=2, help="requests in the profiled batch (0: no profile)")
    ap.add_argument("--nll-stop", type=float, default=None, help="override the method's nll_stop (to see the lever)")
    ap.add_argument("--steps", type=int, default=None, help="override the method's step limit")
    ap.add_argument("--lever", default="all", choices=["all", *SWITCHES],
                    help="the speed switch(es) 'old' turns off (default all: today's path)")
    ap.add_argument("--precision", default="float32", choices=["float32", "bfloat16"],
                    help="target precision of both runs (default float32)")
    ap.add_argument("--new-precision", default=None, choices=["float32", "bfloat16"],
                    help="target precision of the 'new' run only (default: --precision)")
    ap.add_argument("--new-set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a TargetConfig field of the 'new' run only, e.g. vocab_subset=1024 (repeatable)")
    args = ap.parse_args(argv)

    lm, records = load(args)
    import torch
    from fedit.core.targets import compute_targets

    reqs = [r.request for r in records]
    hp, templates, base = target_setup(lm, args.method)
    base = dataclasses.replace(base, nll_stop=base.nll_stop if args.nll_stop is None else args.nll_stop,
                               steps=args.steps or base.steps)
    batch = args.batch or getattr(hp, "v_batch_size", 1)
    ac = {"float32": None, "bfloat16": "bfloat16"}
    base = dataclasses.replace(base, autocast=ac[args.precision])
    off = {k: False for k in SWITCHES} if args.lever == "all" else {args.lever: False}
    new_set = {}
    for kv in args.new_set:
        k, _, v = kv.partition("=")
        if k not in {f.name for f in dataclasses.fields(base)}:
            ap.error(f"--new-set {kv}: {k!r} is not a TargetConfig field")
        new_set[k] = json.loads(v)
    cfgs = {"old": dataclasses.replace(base, **off),
            "new": dataclasses.replace(base, **{k: True for k in off}, autocast=ac[args.new_precision or args.precision],
                                       **new_set)}
    compute_targets(lm, reqs[:1], templates, dataclasses.replace(base, steps=1))  # warm-up
    order = [("old", "new") if i % 2 == 0 else ("new", "old") for i in range(args.repeats)]
    results, seconds = {}, {"old": math.inf, "new": math.inf}
    for pair in order:
        for name in pair:
            t0 = time.perf_counter()
            results[name] = compute_targets(lm, reqs, templates, cfgs[name], batch_size=batch)
            seconds[name] = min(seconds[name], time.perf_counter() - t0)
    old, new = results["old"], results["new"]
    z_rel = max(float((b.z - a.z).norm() / a.z.norm()) for a, b in zip(old, new))
    per_target = [{"case_id": q.case_id, "steps": a.steps, "nll_old": round(a.nll_end, 4), "nll_new": round(b.nll_end, 4),
                   "p_old": round(math.exp(-a.nll_end), 4), "p_new": round(math.exp(-b.nll_end), 4)}
                  for q, a, b in zip(reqs, old, new)]
    out = {
        "method": args.method, "model": lm.name, "device": str(lm.device), "n": len(reqs), "batch": batch,
        "steps_limit": base.steps, "nll_stop": base.nll_stop, "templates": len(templates),
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "python": platform.python_version(), "repeats": args.repeats, "load_average": list(os.getloadavg()),
        "configs": {k: {s: getattr(c, s) for s in (*SWITCHES, "autocast", "vocab_subset", "vocab_refresh")}
                    for k, c in cfgs.items()},
        "seconds_per_request": {k: round(v / len(reqs), 3) for k, v in seconds.items()},
        "speedup": round(seconds["old"] / seconds["new"], 3),
        "mean_steps": round(sum(r.steps for r in new) / len(new), 2),
        "mean_nll_end": {k: round(sum(r.nll_end for r in v) / len(v), 4) for k, v in results.items()},
        "z_relative_distance_max": z_rel, "per_target": per_target,
    }
    lines = [f"target optimisation, {args.method} config ({len(templates)} templates, {base.steps} steps, "
             f"nll_stop {base.nll_stop}), {len(reqs)} requests in batches of {batch} on {lm.name} "
             f"({out['device']}, {out['threads']} threads, load {out['load_average'][0]:.2f}):"]
    lines += [f"  {k} ({', '.join(f'{s}={getattr(cfgs[k], s)}' for s in (*off, 'autocast'))}): {out['seconds_per_request'][k]:7.2f} s/request, "
              f"mean NLL after {out['mean_nll_end'][k]:.3f}" for k in ("old", "new")]
    lines.append(f"  speed-up {out['speedup']:.2f}x; mean steps {out['mean_steps']}; "
                 f"max |z_new - z_old| / |z_old| = {z_rel:.1e}")
    lines.append("  case_id  steps  NLL old  NLL new  p old   p new")
    lines += [f"  {t['case_id']!s:>7}  {t['steps']:5d}  {t['nll_old']:7.4f}  {t['nll_new']:7.4f}  {t['p_old']:.4f}  "
              f"{t['p_new']:.4f}" for t in per_target]
    sys.stderr.write("\n".join(lines) + "\n")  # the timing now: a profile that is cut short loses nothing
    sys.stderr.flush()
    out["profile"] = {}
    for name in ("old", "new") if args.profile_n else ():
        few = reqs[:args.profile_n]
        p = out["profile"][name] = _profile(lambda c=cfgs[name]: compute_targets(lm, few, templates, c, batch_size=batch))
        sys.stderr.write(stage_lines(f"profile, {name} loop, {args.profile_n} requests: {p['total_s']} s in all "
                                     "(under the profiler)", {k.split(".")[1]: v for k, v in p["stages_s"].items()},
                                     p["top_ops_self_s"]))
        sys.stderr.flush()
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
