"""How far real FedEdit MKVs lie below the receiver's norm bound (``fedit.federation.guard``).

A measuring script, not a test. It loads a model (default: Gemma 3 270M, offline), has one
FedEdit client edit the first ``--n`` CounterFact records of the shipped sample (private
mode, the shipped MEMIT hyperparameters), and prints, per tensor kind (z, key.l, resid.l),
the largest ratio ‖v‖ / scale, where scale is what a receiver measures on its own copy of the
model (``measure_scale``). A received MKV is refused above ``norm_factor`` (default 20).

    python benchmarks/mkv_bounds.py --n 4 --threads 2
    python benchmarks/mkv_bounds.py --model <folder> --n 2 --json
"""

from __future__ import annotations

import argparse
import json


def ratios(client, batch) -> dict[str, float]:
    """Largest ‖v‖ / scale per tensor name over the facts of ``batch``."""
    from fedit.federation.guard import measure_scale

    scale = measure_scale(client.lm, client.hp.layers)
    out = {"mkv": float(batch.vectors.norm(dim=1).max()) / scale.h_norm}
    for p in batch.payloads:
        for name, t in p.items():
            out[name] = max(out.get(name, 0.0), float(t.norm()) / scale.bound(name))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--n", type=int, default=4, help="CounterFact records (one batch)")
    ap.add_argument("--match", default="z", choices=["z", "delta"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from fedit import load_model
    from fedit.data.loaders import load_records
    from fedit.federation.fededit import FedEditClient
    from fedit.methods import Resources, hparams_for

    lm = load_model(a.model)
    recs = load_records("counterfact", None, a.n)
    client = FedEditClient("m", lm, hparams_for("memit", lm), Resources(), match=a.match)
    batch = client.local_edit(0, [r.request for r in recs], [str(i) for i in range(len(recs))])
    client.to_base()
    r = ratios(client, batch)
    if a.json:
        print(json.dumps({"model": lm.name, "n": len(recs), "ratios": r}))
    else:
        for k, v in sorted(r.items()):
            print(f"{k:10s} {v:8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
