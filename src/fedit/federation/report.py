"""The FedEdit report: per-client and mean metrics, the centralised MEMIT reference on the union
of the requests, retention, the FedAvg comparison, MKV computations saved by reuse, wall time.
JSON + Markdown + a PNG chart. No Flower import.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from statistics import mean
from typing import Any

import torch

from fedit.evaluate.runner import aggregate, measure, record_metrics

KEYS = {"counterfact": ["efficacy_success", "paraphrase_success", "neighborhood_success", "score"],
        "zsre": ["efficacy_acc", "paraphrase_acc", "specificity_acc"]}


def _kind(dataset: str) -> str:
    return "zsre" if dataset == "zsre" else "counterfact"


def centralised_reference(lm, records_by_client: dict[str, list], settings, zs: dict[str, torch.Tensor] | None = None,
                          resources=None) -> dict[str, Any]:
    """MEMIT (as published, layer by layer) on the union of every client's requests, same model and
    layers, measured on each client's records. ``zs`` (by fact id) reuses targets already optimised
    on the base model; the others are optimised here."""
    from fedit.methods import Resources, get_method, hparams_for

    res = resources or Resources(cache_dir=settings.cache_dir or None, corpus=settings.corpus or None)
    hp = hparams_for(settings.method, lm, settings.hparam_overrides(), settings.hparams_file or None)
    method = get_method(settings.method)
    if getattr(hp, "form", "layerwise") != "layerwise":
        import dataclasses

        hp = dataclasses.replace(hp, form="layerwise")
    ids = [f"{c}/{r.case_id}" for c, recs in records_by_client.items() for r in recs]
    reqs = [r.request for recs in records_by_client.values() for r in recs]
    t0 = time.perf_counter()
    have = zs or {}
    given = [f in have for f in ids]
    targets = None
    if any(given):  # reuse what is given; optimise only the others (one batch), then solve all together
        from fedit.methods.targets import targets_for

        missing = [q for q, g in zip(reqs, given) if not g]
        fresh = iter(targets_for(lm, missing, hp, res.templates(lm, hp.context_template_length_params),
                                 res.target_store())[0] if missing else [])
        targets = torch.stack([have[f].float() if g else next(fresh).float() for f, g in zip(ids, given)])
    out = method.run(lm, reqs, hp, res, zs=targets)
    edit_seconds = time.perf_counter() - t0
    kind = _kind(settings.dataset)
    all_recs = [r for recs in records_by_client.values() for r in recs]
    raw_pre = measure(lm, all_recs)
    with out.deltas.applied(lm.model):
        raw_post = measure(lm, all_recs)
    per = [record_metrics(a, p, kind) for a, p in zip(raw_post, raw_pre)]
    per_pre = [record_metrics(p, None, kind) for p in raw_pre]
    by_client, i = {}, 0
    for c, recs in records_by_client.items():
        by_client[c] = aggregate(per[i:i + len(recs)])
        i += len(recs)
    return {"method": f"{method.name} (layer by layer, one batch on the union)", "n": len(all_recs),
            "metrics": aggregate(per), "metrics_pre": aggregate(per_pre), "clients": by_client,
            "edit_seconds": round(edit_seconds, 3), "zs_reused": sum(given),
            "residual_norms": out.diagnostics.get("residual_norms")}


def _mean_over_clients(clients: dict[str, dict], which: str, keys: list[str]) -> dict[str, float]:
    out = {}
    for k in keys:
        vals = [c[which][k] for c in clients.values() if k in c.get(which, {})]
        if vals:
            out[k] = mean(vals)
    return out


def _possible_hits(uploaded: dict[str, int]) -> int:
    """How many other clients' MKVs the clients that uploaded some in a slot were compared with."""
    total = sum(uploaded.values())
    return sum(total - n for n in uploaded.values() if n > 0)


def _hit_note(r: dict[str, Any]) -> list[str]:
    """A line when the hit rule did not tell facts apart (all hits) or shared nothing (no hit)."""
    ru, match = r["reuse"], r["settings"].get("match", "z")
    rate, possible = ru.get("hit_rate"), ru.get("hits_possible") or 0
    if rate is None or possible < 2:
        return []
    if rate == 1.0:
        hint = (" `--match delta` compares the edits' directions (z − h) instead; on Gemma 3 270M the z of "
                "unrelated facts have cosines of 0.96–0.99 (docs/federation.md)." if match == "z" else
                " A larger τ makes the rule stricter.")
        return ["", f"Every one of the {possible} possible hits was a hit (rule on {match}, τ = {r['tau']}): the "
                "rule did not tell the facts apart, so every client took every other client's facts." + hint]
    if rate == 0.0:
        return ["", (f"None of the {possible} possible hits was a hit (rule on {match}, τ = {r['tau']}): every "
                     "client kept only its own facts.")]
    return []


def _covered(per_client: dict[str, dict], per_mkv: float | None) -> dict[str, Any]:
    """GRACE: own edits that reused entries already answered (no value optimised) and the time saved."""
    n = sum(c["covered"] for c in per_client.values())
    return {"own_edits_covered": n, "covered_seconds_saved_estimate": round(n * per_mkv, 3) if per_mkv else None}


def build(fed: dict[str, Any], reference: dict[str, Any] | None, wall_seconds: float) -> dict[str, Any]:
    s = fed["settings"]
    keys = KEYS[_kind(s["dataset"])]
    report: dict[str, Any] = {"settings": s, "clients": fed["clients"], "mode": s["mode"], "tau": s["tau"],
                              "seconds": round(wall_seconds, 3), "federation_seconds": fed.get("seconds")}
    slots = fed.get("slots", [])
    hits = sum(v["applied"] for sl in slots for v in sl["reuse"].values())
    unusable = sum(v.get("unusable", 0) for sl in slots for v in sl["reuse"].values())
    uploaded = sum(sum(sl["uploaded"].values()) for sl in slots)
    possible = sum(_possible_hits(sl["uploaded"]) for sl in slots)
    per_client = {}
    mkv_secs, n_mkv = 0.0, 0
    for c, ev in fed.get("fededit", {}).items():
        rep = ev["report"]
        mkv_secs += rep["mkv_seconds"]
        n_mkv += rep["mkvs_computed"]
        per_client[c] = {"pre": {k: ev["pre"].get(k) for k in keys}, "post": {k: ev["post"].get(k) for k in keys},
                         "own": rep["own_facts"], "reused": rep["reused"], "unusable": rep["unusable"],
                         "mkv_seconds": round(rep["mkv_seconds"], 3), "reedit_seconds": round(rep["reedit_seconds"], 3),
                         "covered": rep.get("covered", 0)}  # GRACE: own facts received entries answered
    report["per_client"] = per_client
    # every received MKV that was refused (by the server or by a receiver's guard): sender, fact token, reason
    report["rejected"] = [r for sl in slots for r in sl.get("rejected", [])]
    fed_clients = fed.get("fededit", {})
    report["fededit"] = {"pre": _mean_over_clients(fed_clients, "pre", keys),
                         "post": _mean_over_clients(fed_clients, "post", keys)}
    per_mkv = mkv_secs / n_mkv if n_mkv else None
    report["reuse"] = {"mkvs_uploaded": uploaded, "mkvs_reused": hits, "hits_unusable": unusable,
                       "hits_possible": possible,  # other clients' MKVs of a slot, summed over clients with own
                       "hit_rate": round((hits + unusable) / possible, 4) if possible else None,
                       "mkv_computations_saved": hits,
                       "seconds_per_mkv": round(per_mkv, 3) if per_mkv is not None else None,
                       "seconds_saved_estimate": round(hits * per_mkv, 3) if per_mkv is not None else None,
                       **_covered(per_client, per_mkv)}
    if "fedavg" in fed and "clients" in fed["fedavg"]:
        fa = fed["fedavg"]["clients"]
        report["fedavg"] = {"post": _mean_over_clients(fa, "post", keys), "seconds": fed["fedavg"]["seconds"],
                            "per_client": {c: {k: ev["post"].get(k) for k in keys} for c, ev in fa.items()}}
    if reference is not None:
        report["centralised"] = reference
        ref_c = reference["clients"]
        ref_mean = {k: mean(ref_c[c][k] for c in ref_c if k in ref_c[c]) for k in keys
                    if any(k in v for v in ref_c.values())}
        report["centralised_mean_over_clients"] = ref_mean
        report["retention"] = {k: (report["fededit"]["post"][k] / ref_mean[k] if ref_mean.get(k) else None)
                               for k in keys if k in report["fededit"]["post"] and k in ref_mean}
        if "fedavg" in report:
            report["fedavg"]["retention"] = {k: (report["fedavg"]["post"][k] / ref_mean[k] if ref_mean.get(k) else None)
                                             for k in keys if k in report["fedavg"]["post"] and k in ref_mean}
    report["headline"] = keys
    return report


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def markdown(r: dict[str, Any]) -> str:
    s, keys = r["settings"], r["headline"]
    lines = [f"# FedEdit ({r['mode']} mode) on {s['dataset']} ({s['model']})", "",
             f"{len(r['clients'])} clients × {s['n-per-client']} requests, {s['slots']} slots, partition "
             f"{s['partition']}, τ = {r['tau']}, method {s['method']}; wall time {r['seconds']:.0f} s.", "",
             "Rates in %; efficacy/paraphrase/neighbourhood are success rates (P(new) > P(true)), "
             "zsRE columns token accuracy.", "",
             "| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    lines.append("| unedited | " + " | ".join(_pct(r["fededit"]["pre"].get(k)) for k in keys) + " |")
    lines.append("| FedEdit (mean of clients) | " + " | ".join(_pct(r["fededit"]["post"].get(k)) for k in keys) + " |")
    if "fedavg" in r:
        lines.append("| FedAvg (mean of clients) | " + " | ".join(_pct(r["fedavg"]["post"].get(k)) for k in keys) + " |")
    if "centralised_mean_over_clients" in r:
        lines.append(f"| centralised {s['method'].upper()} on the union | " +
                     " | ".join(_pct(r["centralised_mean_over_clients"].get(k)) for k in keys) + " |")
    if "retention" in r:
        lines += ["", "Retention (FedEdit / centralised): " +
                  ", ".join(f"{k} {_pct(v)}%" for k, v in r["retention"].items())]
        if "fedavg" in r and "retention" in r["fedavg"]:
            lines.append("Retention (FedAvg / centralised): " +
                         ", ".join(f"{k} {_pct(v)}%" for k, v in r["fedavg"]["retention"].items()))
    ru = r["reuse"]
    lines += ["", f"MKVs uploaded {ru['mkvs_uploaded']}, reused {ru['mkvs_reused']} (computations saved), "
              f"unusable hits {ru['hits_unusable']}; {ru['seconds_per_mkv']} s per MKV, so about "
              f"{ru['seconds_saved_estimate']} s of target optimisation saved."
              + (f" Hit rate {_pct(ru['hit_rate'])}% of {ru['hits_possible']} possible." if ru.get("hit_rate")
                 is not None else "")
              + (f" {ru['own_edits_covered']} own edits were answered by reused entries (no value optimised): about "
                 f"{ru['covered_seconds_saved_estimate']} s saved." if ru.get("own_edits_covered") else ""),
              *_hit_note(r), "",
              "| client | own | reused | " + " | ".join(f"{k} pre" for k in keys) + " | " +
              " | ".join(f"{k} post" for k in keys) + " |", "|---|---|---|" + "---|" * (2 * len(keys))]
    for c, v in r["per_client"].items():
        lines.append(f"| {c} | {v['own']} | {v['reused']} | " + " | ".join(_pct(v["pre"].get(k)) for k in keys) +
                     " | " + " | ".join(_pct(v["post"].get(k)) for k in keys) + " |")
    return "\n".join(lines + _rejected_lines(r.get("rejected", []))) + "\n"


def _rejected_lines(rejected: list[dict]) -> list[str]:
    """The refused MKVs, one line each: who sent it, who refused it, why."""
    if not rejected:
        return []
    return ["", f"{len(rejected)} received MKV(s) refused (not applied; the run went on with the rest):", ""] + [
        f"- from {x.get('from', '?')}, refused by {x.get('by', '?')} (fact {x.get('fact') or '?'}): {x.get('reason')}"
        for x in rejected]


def chart(r: dict[str, Any], path: Path) -> None:
    from fedit.evaluate.report import bar_chart

    runs = [("unedited", r["fededit"]["pre"]), ("FedEdit", r["fededit"]["post"])]
    if "fedavg" in r:
        runs.append(("FedAvg", r["fedavg"]["post"]))
    if "centralised_mean_over_clients" in r:
        runs.append((f"centralised {r['settings']['method'].upper()}", r["centralised_mean_over_clients"]))
    s = r["settings"]
    bar_chart(path, r["headline"], runs,
              f"FedEdit {r['mode']} · {len(r['clients'])} clients × {s['n-per-client']} · {s['model']}")


def write_private(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically, readable by its owner only (0600), like the MKV
    store beside it (``federation.json``, ``federation.error.json``)."""
    from fedit.atomic import replace_with

    def write(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)

    return replace_with(path, write)


def write(r: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, str]:
    from fedit.evaluate.report import write_files

    return write_files(r, out_dir, markdown, chart)
