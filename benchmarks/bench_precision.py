"""Target optimisation in float32 vs under bfloat16 autocast (``target_precision``), same process.

A measuring script, not a test: it prints figures and asserts nothing about time. It loads the
default model (Gemma 3 270M, offline), takes ``--n`` CounterFact requests and optimises their
targets with the method's shipped configuration twice, once per precision, in the order given
by ``--order`` (repeat with the other order to see the noise of a shared machine). Reported:
seconds per request for each precision and their ratio, the final NLL of each, and how far the
bfloat16 targets are from the float32 ones (relative distance of z, cosine of δ = z − h).

    python benchmarks/bench_precision.py --n 16 --threads 2
    python benchmarks/bench_precision.py --method rome --n 4 --json
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time

from _bench import load, parser, target_setup


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, n=16, dataset=False)
    ap.add_argument("--method", default="memit", choices=["memit", "rome", "pmet", "alphaedit"])
    ap.add_argument("--precision", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--order", default="low-first", choices=["low-first", "float32-first"])
    args = ap.parse_args(argv)

    lm, records = load(args)
    import torch
    from fedit.core.targets import compute_targets

    reqs = [r.request for r in records]
    hp, templates, base = target_setup(lm, args.method)
    batch = getattr(hp, "v_batch_size", 1)
    runs = {"float32": dataclasses.replace(base, autocast=None),
            args.precision: dataclasses.replace(base, autocast=args.precision)}
    order = [args.precision, "float32"] if args.order == "low-first" else ["float32", args.precision]
    compute_targets(lm, reqs[:1], templates, dataclasses.replace(base, steps=1))  # warm-up
    results, seconds = {}, {}
    for name in order:
        t0 = time.perf_counter()
        results[name] = compute_targets(lm, reqs, templates, runs[name], batch_size=batch)
        seconds[name] = time.perf_counter() - t0
    full, low = results["float32"], results[args.precision]
    z_rel = [float((b.z - a.z).norm() / a.z.norm()) for a, b in zip(full, low)]
    cos = [float(torch.nn.functional.cosine_similarity(a.delta, b.delta, dim=0)) for a, b in zip(full, low)]
    out = {
        "method": args.method, "model": lm.name, "device": str(lm.device), "n": len(reqs),
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "python": platform.python_version(), "order": order, "load_average": list(os.getloadavg()),
        "seconds_per_request": {k: round(v / len(reqs), 3) for k, v in seconds.items()},
        "speedup": round(seconds["float32"] / seconds[args.precision], 3),
        "mean_nll_end": {k: round(sum(r.nll_end for r in v) / len(v), 4) for k, v in results.items()},
        "z_relative_distance": {"max": round(max(z_rel), 5), "mean": round(sum(z_rel) / len(z_rel), 5)},
        "delta_cosine": {"min": round(min(cos), 5), "mean": round(sum(cos) / len(cos), 5)},
    }
    text = (f"target optimisation, {args.method} config, {len(reqs)} requests on {lm.name} ({out['device']}, "
            f"{out['threads']} threads, load {out['load_average'][0]:.2f}):\n"
            + "".join(f"  {k:9s} {out['seconds_per_request'][k]:7.2f} s/request  mean NLL after "
                      f"{out['mean_nll_end'][k]:.3f}\n" for k in order)
            + f"  speed-up {out['speedup']:.2f}x; |z_{args.precision} - z_float32| / |z_float32| "
              f"max {out['z_relative_distance']['max']:.4f}; cos(delta) min {out['delta_cosine']['min']:.5f}\n")
    if args.json:
        sys.stderr.write(text)
        print(json.dumps(out))
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
