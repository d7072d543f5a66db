"""Where an edit's time goes: a stage profile of one edit on today's path and with the speed-ups.

A measuring script, not a test: it prints figures and asserts nothing about time. It loads the
default model, takes the first ``--n`` CounterFact records and, for each path (``today``: the
speed switches off and the settings the method's file shipped before the speed work,
``_bench.BEFORE``; ``new``: as shipped), runs under ``torch.profiler`` one ``fedit.edit`` of all
of them with ``--method`` (MEMIT: one batch; ROME: one edit after another) and then the
teacher-forced measurement of the same records on the edited model, which it reverts afterwards.
Printed per stage (inclusive seconds; stages nest, e.g. the targets' sub-stages are inside
``targets``):

- ``edit.statistics``: the layers' second moments (from the cache after the warm-up);
- ``targets``: target optimisation, split into ``targets.first_forward`` (the lower blocks, once
  per batch), ``targets.upper_forward``, ``targets.projection`` (unembedding and log-softmax over
  the vocabulary), ``targets.kl`` and ``targets.backward``;
- ``edit.keys``, ``edit.residual``, ``edit.pullback``, ``edit.solve``, ``edit.backtrack``: MEMIT's
  spreading over layers (ROME: keys and solve);
- ``measure``: the measurement of the records after the edit;

and the operators that took the most time. A warm-up (not profiled) loads the statistics and
context templates and runs one short target optimisation.

    python benchmarks/profile_edit.py --method memit --n 16 --threads 1
    python benchmarks/profile_edit.py --method rome --n 1 --threads 1 --precision bfloat16
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from _bench import before, load, parser, stage_lines

STAGES = ["edit", "edit.statistics", "targets", "targets.first_forward", "targets.upper_forward",
          "targets.projection", "targets.kl", "targets.backward", "edit.keys", "edit.residual", "edit.pullback",
          "edit.solve", "edit.backtrack", "measure"]


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, n=16)
    ap.add_argument("--method", default="memit", choices=["memit", "rome", "pmet", "alphaedit"])
    ap.add_argument("--precision", default="float32", choices=["float32", "bfloat16"], help="target precision")
    ap.add_argument("--hparams", default=None, help="hyperparameter file over the model's (default: none)")
    ap.add_argument("--corpus", default=None, help="text for second moments (default: the shipped sample)")
    ap.add_argument("--paths", default="today,new", help="which paths to profile, in order (default today,new)")
    args = ap.parse_args(argv)
    lm, records = load(args)
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    import fedit
    from fedit.core.targets import compute_targets
    from fedit.core.templates import flat
    from fedit.evaluate.runner import measure
    from fedit.methods import Resources, hparams_for

    reqs = [r.request for r in records]
    res = Resources(corpus=args.corpus) if args.corpus else Resources()
    t0 = time.perf_counter()
    hp0 = hparams_for(args.method, lm, None, args.hparams)
    res.second_moments(lm, hp0.layers, hp0.mom2_samples, hp0.mom2_seq_len)
    templates = flat(res.templates(lm, hp0.context_template_length_params))
    res.templates(lm, hparams_for(args.method, lm, before(args.method), args.hparams).context_template_length_params)
    compute_targets(lm, reqs[:1], templates, dataclasses.replace(hp0.target_config(), steps=1))
    warm = time.perf_counter() - t0
    out = {"method": args.method, "model": lm.name, "n": len(reqs), "precision": args.precision,
           "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "warm_up_s": round(warm, 1),
           "load_average": list(os.getloadavg()), "paths": {}}
    sys.stderr.write(f"{args.method}, {len(reqs)} records, {args.precision} targets, {out['threads']} threads "
                     f"(warm-up {warm:.0f} s, load {out['load_average'][0]:.2f}):\n")
    for path in args.paths.split(","):
        over = {} if path == "new" else before(args.method)
        hp = hparams_for(args.method, lm, {**over, "target_precision": args.precision}, args.hparams)
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function("edit"):
                result = fedit.edit(lm, reqs, method=args.method, hparams=hp, resources=res, check=False)
            with record_function("measure"):
                measure(lm, records)
        total = time.perf_counter() - t0
        result.applied.revert()
        ev = prof.key_averages()
        stages = {e.key: e.cpu_time_total / 1e6 for e in ev if e.key in STAGES}
        # all the target optimisation of the edit (its sub-stages are labelled inside it)
        stages["targets"] = result.outcome.target_seconds
        ops = sorted((e for e in ev if e.key not in STAGES and not e.key.startswith(("targets.", "edit."))),
                     key=lambda e: -e.self_cpu_time_total)[:8]
        p = out["paths"][path] = {
            "total_s": round(total, 2), "edit_s": round(result.outcome.seconds, 2),
            "stages_s": {k: round(stages.get(k, 0.0), 3) for k in STAGES},
            "top_ops_self_s": {e.key: round(e.self_cpu_time_total / 1e6, 2) for e in ops}}
        sys.stderr.write(stage_lines(f"{path}: {p['total_s']} s under the profiler (edit {p['edit_s']} s)",
                                     p["stages_s"], p["top_ops_self_s"]))
        sys.stderr.flush()
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
