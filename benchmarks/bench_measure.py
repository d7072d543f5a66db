"""Measuring records: probes with coinciding inputs read from one forward pass vs one pass each.

A measuring script, not a test: it prints figures and asserts nothing about time. It loads the
default model (Gemma 3 270M, offline) and measures the first ``--n`` records of a dataset with
``fedit.evaluate.runner.measure`` twice per repeat, alternating the two ways (``share`` on: the
new and the true target after the same prompt, and any input that begins another, are read from
one pass; off: every probe runs its own sequence). Reported: seconds per record for each way and
their ratio (medians over ``--repeats``), how many sequences each way runs, and the largest
difference of a probe's NLL between the two (float noise only: the logits are the same).

    python benchmarks/bench_measure.py --n 50 --threads 2
    python benchmarks/bench_measure.py --dataset zsre --data zsre_mend_eval_portability_gpt4.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from _bench import load, parser


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, n=50)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    lm, records = load(args)
    import torch
    from fedit.core.probe import encode_pairs, probe_inputs, shared_inputs
    from fedit.evaluate.runner import _probes, measure

    probes = [(p, a) for r in records for (_, p, a, _) in _probes(r)]
    runs, _ = shared_inputs(probe_inputs(encode_pairs(lm.tokenizer, [p for p, _ in probes], [a for _, a in probes])))
    measure(lm, records[:2])  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    results: dict[bool, list] = {}
    for _ in range(args.repeats):
        for share in (False, True):
            t0 = time.perf_counter()
            results[share] = measure(lm, records, share=share)
            times[share].append(time.perf_counter() - t0)
    diff = 0.0
    for a, b in zip(results[True], results[False]):
        for group, scores in a.items():
            for i, s in scores.items():
                diff = max(diff, abs(s["nll_sum"] - b[group][i]["nll_sum"]))
    med = {k: statistics.median(v) / len(records) for k, v in times.items()}
    out = {"model": lm.name, "dataset": args.dataset, "records": len(records), "probes": len(probes),
           "sequences_shared": len(runs), "sequences_each": len(probes), "threads": torch.get_num_threads(),
           "s_per_record_each": round(med[False], 4), "s_per_record_shared": round(med[True], 4),
           "speedup": round(med[False] / med[True], 2), "max_nll_difference": diff}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{out['model']}, {out['records']} {args.dataset} records, {out['probes']} probes, "
              f"{out['threads']} threads")
        print(f"one pass per probe:        {out['sequences_each']} sequences, {out['s_per_record_each']} s/record")
        print(f"coinciding inputs shared:  {out['sequences_shared']} sequences, "
              f"{out['s_per_record_shared']} s/record")
        print(f"speed-up {out['speedup']}x; largest NLL difference {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
