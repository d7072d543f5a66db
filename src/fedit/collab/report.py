"""The parts of a CollabEdit report that every engine builds alike: one round's entry, the
annotated resolution, the comparison with the global reference."""

from __future__ import annotations

from typing import Any

import torch

from fedit.collab.client import pool


def annotate(resolution: dict[str, Any], plan: dict[str, list[list]], rnd: int) -> dict[str, Any]:
    """Add case ids and readable text to a resolution's entries (for the operator's report)."""
    def desc(ci):
        c, i = ci
        q = plan[c][rnd][i].request
        return {"client": c, "index": i, "case_id": q.case_id, "fact": f"{q.prompt.format(q.subject)} → {q.target_new}"}

    out = dict(resolution)
    out["duplicates"] = [{**d, "kept_fact": desc(d["kept"]) if d["kept"] else None,
                          "dropped_facts": [desc(x) for x in d["dropped"]]} for d in resolution["duplicates"]]
    out["conflicts"] = [{**c, "kept_fact": desc(c["kept"]) if c["kept"] else None,
                         "rejected_facts": [desc(x) for x in c["rejected"]]} for c in resolution["conflicts"]]
    return out


def round_entry(rnd: int, counts: dict[str, dict[str, Any]], evals: dict[str, dict[int, dict]],
                seconds: dict[str, float], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One round of one method: counts per client, metrics pooled every way the report shows."""
    by_round: dict[int, list] = {}
    by_client: dict[str, list] = {}
    pre: list = []
    for c, ev in evals.items():
        for s, parts in ev.items():
            by_round.setdefault(int(s), []).append(parts["post"])
            by_client.setdefault(c, []).append(parts["post"])
            pre.append(parts["pre"])
    entry = {
        "round": rnd + 1,
        "clients": counts,
        "submitted": sum(v["submitted"] for v in counts.values()),
        "kept": sum(v["kept"] for v in counts.values()),
        "vanished": sum(len(v["vanished"]) for v in counts.values()),
        "edited": sum(v["used"] for v in counts.values()),
        "metrics": pool(sum(by_round.values(), [])) if by_round else {},
        "metrics_pre": pool(pre) if pre else {},
        "by_round": {str(s + 1): pool(p) for s, p in sorted(by_round.items())},
        "by_client": {c: pool(p) for c, p in by_client.items()},
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    entry.update(extra or {})
    return entry


def relative_diff(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> dict[str, float]:
    """max |a − b| and that over max |b|, across layers (for the identity check)."""
    if not a or not b or sorted(a) != sorted(b):
        return {}
    num = max(float((a[l].double() - b[l].double()).abs().max()) for l in a)
    den = max(float(b[l].double().abs().max()) for l in b)
    return {"max_abs_diff": num, "relative": num / den if den else float("nan")}


def attach_reference(report: dict[str, Any], reference: dict[str, Any], deltas: dict[str, list[dict]],
                     form: str = "base") -> None:
    """Put a reference into a report, with each method's Δ compared round by round to the global
    MEMIT of the same ``form``: base form; layer by layer (one round), or layer by layer round after
    round with the same running C₁ (several rounds, ``reference.sequential_layerwise``)."""
    report["reference"] = reference["report"]
    refs = reference["deltas"] if form == "base" else (reference.get("sequential_deltas")
                                                        or reference.get("layerwise_deltas", []))
    for m, ds in deltas.items():
        for entry, d, ref in zip(report["runs"][m]["rounds"], ds, refs):
            entry["vs_reference"] = relative_diff(d, ref)


def summary(engine: str, clients: list[str], rounds: int, merges, resolutions: list[dict[str, Any]],
            runs: dict[str, Any]) -> dict[str, Any]:
    """The report's common head: who took part, what the server resolved, each method's rounds."""
    return {"kind": "collab", "engine": engine, "clients": list(clients), "rounds": rounds, "merges": list(merges),
            "resolution": resolutions,
            "duplicates_total": sum(r["n_duplicates"] for r in resolutions),
            "conflicts_total": sum(r["n_conflicts"] for r in resolutions),
            "rejected_total": sum(r["n_rejected"] for r in resolutions),
            "runs": runs}
