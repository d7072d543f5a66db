"""What generation_success costs beside teacher forcing, and what it reads on the unedited model.

A measuring script, not a test: it prints figures and asserts nothing about time. It loads the
default model (Gemma 3 270M, offline), measures the first ``--n`` records of a dataset with the
teacher-forced probes (``fedit.evaluate.runner.measure``) and with the greedy continuations of
``generation_success`` (``fedit.evaluate.generation.measure_generation``: each as long as its
answer plus ``--extra`` tokens; the first ``--neighbours`` neighbourhood prompts), and reports seconds per record for each (medians over ``--repeats``) and the
unedited model's rates (its generation_efficacy should be near 0, generation_neighborhood is
how often it says the true answer of a neighbour unprompted).

    python benchmarks/bench_generation_success.py --n 50 --threads 2
"""

from __future__ import annotations

import json
import statistics
import time

from _bench import load, parser


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, n=50)
    ap.add_argument("--extra", type=int, default=3)
    ap.add_argument("--neighbours", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    lm, records = load(args)
    import torch
    from fedit.evaluate.generation import generation_probes, measure_generation
    from fedit.evaluate.runner import _probes, aggregate, measure, record_metrics

    measure(lm, records[:2])  # warm-up
    measure_generation(lm, records[:2], args.extra, args.neighbours)
    times: dict[str, list[float]] = {"teacher_forced": [], "greedy": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        raw = measure(lm, records)
        times["teacher_forced"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        gen = measure_generation(lm, records, args.extra, args.neighbours)
        times["greedy"].append(time.perf_counter() - t0)
    for r, g in zip(raw, gen):
        r.update(g)
    m = aggregate([record_metrics(r, None, args.dataset) for r in raw])
    med = {k: statistics.median(v) / len(records) for k, v in times.items()}
    out = {"model": lm.name, "dataset": args.dataset, "records": len(records), "threads": torch.get_num_threads(),
           "probes_teacher_forced": sum(len(_probes(r)) for r in records),
           "continuations": sum(len(generation_probes(r, args.neighbours)) for r in records),
           "extra_tokens": args.extra,
           "s_per_record_teacher_forced": round(med["teacher_forced"], 4),
           "s_per_record_greedy": round(med["greedy"], 4),
           "unedited": {k: round(v, 4) for k, v in m.items() if k.startswith("generation_") or k.endswith("_success")}}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{out['model']}, {out['records']} {args.dataset} records, {out['threads']} threads")
        print(f"teacher forcing: {out['probes_teacher_forced']} probes, {out['s_per_record_teacher_forced']} s/record")
        print(f"greedy, answer + {args.extra} tokens: {out['continuations']} continuations, "
              f"{out['s_per_record_greedy']} s/record")
        print("unedited model: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in out["unedited"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
