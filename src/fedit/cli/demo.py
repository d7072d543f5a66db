"""``fedit demo``: edit a few well-known facts in the default model, show before/after, revert."""

from __future__ import annotations

import time

import torch

from fedit.requests import EditRequest

FACTS = [
    EditRequest(prompt="The {} is located in the city of", subject="Eiffel Tower", target_new="Rome",
                target_true="Paris", case_id="eiffel"),
    EditRequest(prompt="{} plays the sport of", subject="Michael Jordan", target_new="soccer",
                target_true="basketball", case_id="jordan"),
    EditRequest(prompt="The official language of {} is", subject="Brazil", target_new="French",
                target_true="Portuguese", case_id="brazil"),
]
# (prompt, target) pairs: paraphrases that should move, unrelated facts that should not.
PARAPHRASES = [
    ("Where is the Eiffel Tower? It is in the city of", "Rome"),
    ("Michael Jordan is a famous player of", "soccer"),
    ("In Brazil, people speak", "French"),
]
UNRELATED = [
    ("The capital of Japan is", "Tokyo"),
    ("The Colosseum is located in the city of", "Rome"),
    ("Lionel Messi plays the sport of", "soccer"),
]


def run_demo(args, lm, emit, table, probe) -> int:
    from fedit.api import edit
    from fedit.methods import Resources

    res = Resources(cache_dir=args.cache_dir, progress=not args.json)
    groups = {
        "edited": [{"text": r.filled_prompt, "target": r.target_new} for r in FACTS],
        "paraphrase": [{"text": p, "target": t} for p, t in PARAPHRASES],
        "unrelated": [{"text": p, "target": t} for p, t in UNRELATED],
    }
    for rows in groups.values():
        probe(lm, rows, "before")
    before_w = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    t0 = time.perf_counter()
    result = edit(lm, FACTS, method=args.method, resources=res)
    seconds = time.perf_counter() - t0
    for rows in groups.values():
        probe(lm, rows, "after")
    result.applied.revert()
    identical = all(torch.equal(p, before_w[n]) for n, p in lm.model.named_parameters())
    out = {"method": args.method, "model": lm.name, "seconds": round(seconds, 3),
           "groups": {k: [{"prompt": r["text"], "target": r["target"], "before": r["before"], "after": r["after"]}
                          for r in rows] for k, rows in groups.items()},
           "reverted_bit_identical": identical,
           "residual_norms": result.outcome.diagnostics.get("residual_norms")}
    text = [f"fedit demo: {args.method} edits {len(FACTS)} facts in {lm.name} ({seconds:.1f} s)", ""]
    for k, rows in groups.items():
        text += [f"[{k}]", table(rows), ""]
    text.append(f"reverted: weights bit-identical to the original: {identical}")
    emit(args, out, "\n".join(text))
    return 0 if identical else 1
