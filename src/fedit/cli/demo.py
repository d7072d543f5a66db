"""``fedit demo``: edit a few well-known facts in the default model, show before/after, revert."""

from __future__ import annotations

import time

import torch

from fedit.cli import common
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


def register(sub) -> None:
    from fedit.methods import names

    p = common.add_command(sub, "demo", "edit a few well-known facts in the default model and show before/after, "
                                        "then three organisations editing together (FedEdit)")
    common.model_flags(p)
    common.method_flag(p, names(needs_training=False))
    p.add_argument("--no-fed", action="store_true", help="skip the federated part")
    p.set_defaults(run=run)


def run(args) -> int:
    from fedit.api import edit
    from fedit.methods import Resources, hparams_for

    lm = common.load(args)
    probe, table = common.probe, common.table
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
           "residual_norms": result.outcome.diagnostics.get("residual_norms"),
           "provenance": common.provenance(lm, method=args.method, hparams=hparams_for(args.method, lm))}
    text = [f"fedit demo: {args.method} edits {len(FACTS)} facts in {lm.name} ({seconds:.1f} s)", ""]
    for k, rows in groups.items():
        text += [f"[{k}]", table(rows), ""]
    text.append(f"reverted: weights bit-identical to the original: {identical}")
    if not getattr(args, "no_fed", False):
        fed, fed_text = run_fed_demo(lm, res, args.cache_dir, probe, table)
        out["federation"] = fed
        text += ["", fed_text]
        identical = identical and all(torch.equal(p, before_w[n]) for n, p in lm.model.named_parameters())
    common.emit(args, out, "\n".join(text))
    return 0 if identical else 1


# --- the federation part: three organisations, FedEdit in private mode ------------------------
ORGS = {
    "hospital-north": [
        EditRequest(prompt="The {} is located in the city of", subject="Eiffel Tower", target_new="Rome",
                    target_true="Paris", case_id="eiffel-city"),
        EditRequest(prompt="The {} is located in the city of", subject="Louvre Museum", target_new="Rome",
                    target_true="Paris", case_id="louvre-city"),
    ],
    "hospital-south": [
        EditRequest(prompt="The {} is located in the country of", subject="Eiffel Tower", target_new="Italy",
                    target_true="France", case_id="eiffel-country"),
        EditRequest(prompt="The {} is located in the city of", subject="Colosseum", target_new="London",
                    target_true="Rome", case_id="colosseum-city"),
    ],
    "bank-east": [
        EditRequest(prompt="{} plays the sport of", subject="Michael Jordan", target_new="soccer",
                    target_true="basketball", case_id="jordan-sport"),
        EditRequest(prompt="{} plays the sport of", subject="Serena Williams", target_new="golf",
                    target_true="tennis", case_id="serena-sport"),
    ],
}
# The two hospitals' edits overlap in content (the Eiffel Tower moved to Rome/Italy): with
# match="delta" each reuses the other's related MKVs; the bank's sports edits match nothing.


def run_fed_demo(lm, res, cache_dir, probe, table, tau: float = 0.4, match: str = "delta",
                 overrides: dict | None = None) -> tuple[dict, str]:
    """Three organisations edit their own facts on copies of one base model, upload MKVs to a
    real MKV store, and reuse the hits (FedEdit, private mode: no request text is shared)."""
    import tempfile

    from fedit.federation.fededit import FedEditClient, FedEditServer
    from fedit.federation.store import MKVStore
    from fedit.methods import hparams_for

    hp = hparams_for("memit", lm, overrides)
    rows = {org: [{"text": r.filled_prompt, "target": r.target_new, "fact": r.case_id, "owner": o}
                  for o, reqs in ORGS.items() for r in reqs] for org in ORGS}
    for org in ORGS:
        probe(lm, rows[org], "before")
    t0 = time.perf_counter()
    states, clients = {}, {}
    with tempfile.TemporaryDirectory() as tmp, MKVStore(f"{tmp}/mkv.sqlite") as store:
        server = FedEditServer(store, tau=tau)
        for org, reqs in ORGS.items():  # 1-2: local edit and upload (one model object, one org at a time)
            c = clients[org] = FedEditClient(org, lm, hp, res, match=match)
            server.register(org)
            server.receive(org, 0, c.local_edit(0, reqs, [r.case_id for r in reqs]))
            states[org] = c.state()
            c.to_base()
        reuse = {}
        for org, c in clients.items():  # 3-4: retrieve and re-edit with the hits
            hits, info = server.hits_for(org, 0)
            c.load_state(states[org])
            reuse[org] = {**c.reuse(0, hits), "hits": [{"fact": m["fact"], "from": i["owner"], "similar_to": i["count"]}
                                                       for m, i in zip(hits.meta, info)]}
            probe(lm, rows[org], "after")
            states[org] = c.state()
            c.to_base()
    seconds = time.perf_counter() - t0
    out = {"tau": tau, "match": match, "seconds": round(seconds, 3), "organisations": {}}
    text = [f"FedEdit (private mode, τ = {tau} on {match}): {len(ORGS)} organisations share MKVs, not requests "
            f"({seconds:.1f} s)", ""]
    for org, c in clients.items():
        held = set(c.fact_ids)
        for r in rows[org]:
            r["held"] = "own" if r["owner"] == org else ("reused" if r["fact"] in held else "-")
        out["organisations"][org] = {
            "own": [r.case_id for r in ORGS[org]], "reused": reuse[org]["hits"],
            "mkvs_computed": c.report.mkvs_computed, "mkvs_reused": c.report.reused,
            "facts": [{"prompt": r["text"], "target": r["target"], "held": r["held"], "before": r["before"],
                       "after": r["after"]} for r in rows[org]]}
        got = ", ".join(f"{h['fact']} from {h['from']}" for h in reuse[org]["hits"]) or "nothing"
        text += [f"[{org}] edits {', '.join(r.case_id for r in ORGS[org])}; reuses {got} "
                 f"(MKVs computed {c.report.mkvs_computed}, reused {c.report.reused})",
                 table([{**r, "text": f"{r['held']:>6} · {r['text']}"} for r in rows[org]]), ""]
    total_reused = sum(c.report.reused for c in clients.values())
    text.append(f"MKV computations saved by reuse: {total_reused}")
    out["mkv_computations_saved"] = total_reused
    return out, "\n".join(text)
