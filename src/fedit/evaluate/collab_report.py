"""Write a collaborative-editing report: report.json, report.md and chart.png.

The report dict comes from ``fedit.collab.run_collab`` or the Flower engine (same shape):
per merge method, per round, metrics pooled over all applied facts, by round of origin and by
client; the global-MEMIT reference; duplicates and conflicts with what was done.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedit.atomic import write_text

CF_KEYS = [("efficacy_success", "ES"), ("paraphrase_success", "PS"), ("neighborhood_success", "NS"), ("score", "Score")]
ZSRE_KEYS = [("efficacy_acc", "efficacy"), ("paraphrase_acc", "paraphrase"), ("specificity_acc", "specificity")]


def _keys(report: dict[str, Any]) -> list[tuple[str, str]]:
    for run in report["runs"].values():
        for r in run["rounds"]:
            if "efficacy_success" in r["metrics"]:
                return CF_KEYS
    return ZSRE_KEYS


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _eff(report) -> str:
    return _keys(report)[0][0]


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: the final table, round by round, per client, duplicates and
    conflicts, time, secure aggregation."""
    keys = _keys(report)
    lines = (_md_header(report, keys) + _md_final(report, keys) + _md_rounds(report, keys) + _md_clients(report, keys)
             + _md_resolution(report) + _md_time(report))
    lines.append(f"Total time: {report.get('seconds', 0):.1f} s.")
    return "\n".join(lines) + "\n"


def _md_header(report: dict[str, Any], keys) -> list[str]:
    style = "success rate" if keys[0][0] == "efficacy_success" else "token accuracy"
    runs = report["runs"]
    vanished = sum(r["vanished"] for run in list(runs.values())[:1] for r in run["rounds"])
    engine = report.get("engine", "local") + (" with SecAgg+" if report.get("secagg") else "")
    return [f"# Collaborative editing on {report.get('dataset', '?')} ({report.get('model', '?')})", "",
            f"{len(report['clients'])} clients × {report.get('per_client', '?')} facts × {report['rounds']} round(s); "
            f"engine: {engine}; merges: {', '.join(report['merges'])}; "
            f"conflict policy: {report.get('config', {}).get('conflict_policy', '?')}.",
            f"Duplicates counted once: **{report['duplicates_total']}**; conflicts: **{report['conflicts_total']}** "
            f"({report['rejected_total']} facts not edited); already said by the model (vanished residual): {vanished}.",
            "", f"Numbers are percentages ({style}, CounterFact-style metrics of `fedit eval`), "
            "over the facts applied so far.", ""]


def _md_final(report: dict[str, Any], keys) -> list[str]:
    """The table after the last round: each merge, the global MEMIT references, the unedited model."""
    runs, ref = report["runs"], (report.get("reference") or {}).get("rounds", [])
    lines = [f"## After round {report['rounds']}", "",
             "| merge | " + " | ".join(k[1] for k in keys) + " | facts | Δ vs global MEMIT (max rel.) |",
             "|---|" + "---|" * (len(keys) + 2)]
    for m, run in runs.items():
        last = run["rounds"][-1] if run["rounds"] else {"metrics": {}}
        mt = last["metrics"]
        diff = last.get("vs_reference", {}).get("relative")
        lines.append(f"| {m} | " + " | ".join(_pct(mt.get(k)) for k, _ in keys) +
                     f" | {mt.get('n', 0)} | {'—' if diff is None else f'{diff:.2e}'} |")
    if ref:
        last = ref[-1]
        for name, label in (("base", "global MEMIT, base form (reference)"), ("layerwise", "global MEMIT, layer by layer"),
                            ("layerwise_sequential", "MEMIT layer by layer, round after round with C₁")):
            if name in last:
                lines.append(f"| {label} | " + " | ".join(_pct(last[name].get(k)) for k, _ in keys) +
                             f" | {last[name].get('n', 0)} | |")
    first = next(iter(runs.values()))["rounds"]
    if first and first[-1].get("metrics_pre"):
        pre = first[-1]["metrics_pre"]
        lines.append("| unedited model | " + " | ".join(_pct(pre.get(k)) for k, _ in keys) + f" | {pre.get('n', 0)} | |")
    return lines + [""]


def _md_rounds(report: dict[str, Any], keys) -> list[str]:
    """Round by round (several rounds only): each round's facts after every round."""
    R, eff, ref = report["rounds"], keys[0][0], (report.get("reference") or {}).get("rounds", [])
    if R <= 1:
        return []
    lines = [f"## Round by round: {keys[0][1]} of each round's facts after every round", ""]
    for m, run in report["runs"].items():
        lines += [f"**{m}**", "",
                  "| after round | " + " | ".join(f"facts of round {s}" for s in range(1, R + 1)) + " | all |",
                  "|---|" + "---|" * (R + 1)]
        for r in run["rounds"]:
            cells = [_pct(r["by_round"].get(str(s), {}).get(eff)) if s <= r["round"] else "" for s in range(1, R + 1)]
            lines.append(f"| {r['round']} | " + " | ".join(cells) + f" | {_pct(r['metrics'].get(eff))} |")
        lines.append("")
    if ref:
        lines += ["**global MEMIT (all facts of rounds ≤ t at once, base form)**", "",
                  "| rounds | " + " | ".join(k[1] for k in keys) + " |", "|---|" + "---|" * len(keys)]
        for r in ref:
            lines.append(f"| 1..{r['round']} | " + " | ".join(_pct(r['base'].get(k)) for k, _ in keys) + " |")
        lines.append("")
    return lines


def _md_clients(report: dict[str, Any], keys) -> list[str]:
    ids, eff = report["clients"], keys[0][0]
    lines = [f"## Per client after round {report['rounds']} ({keys[0][1]} of the client's applied facts; "
             "facts edited)", "", "| merge | " + " | ".join(ids) + " |", "|---|" + "---|" * len(ids)]
    for m, run in report["runs"].items():
        bc = run["rounds"][-1]["by_client"] if run["rounds"] else {}
        lines.append(f"| {m} | " + " | ".join(f"{_pct(bc[c].get(eff))} ({bc[c].get('n', 0)})" if c in bc else "— (0)"
                                             for c in ids) + " |")
    return lines + [""]


def _md_resolution(report: dict[str, Any]) -> list[str]:
    """Duplicates and conflicts of each round, and how they were resolved."""
    lines = ["## Duplicates and conflicts", ""]
    for t, r in enumerate(report.get("resolution", [])):
        lines.append(f"Round {t + 1}: {r['n_duplicates']} duplicate(s), {r['n_conflicts']} conflict(s), "
                     f"{r['n_rejected']} fact(s) rejected.")
        for d in r["duplicates"]:
            kept = d.get("kept_fact")
            what = (kept or (d.get("dropped_facts") or [{}])[0]).get("fact", d["key"])
            lines.append(f"- duplicate ({d['kind']}): {what}; kept "
                         f"{kept['client'] if kept else 'the earlier edit'}, dropped "
                         + ", ".join(f"{x['client']}" for x in d.get("dropped_facts", [])))
        for c in r["conflicts"]:
            facts = "; ".join(f"{x['client']}: {x['fact']}" for x in ([c["kept_fact"]] if c.get("kept_fact") else [])
                              + c.get("rejected_facts", []))
            lines.append(f"- conflict [{c['policy']}] {c['resolution']} — {facts}")
        lines.append("")
    return lines


def _md_time(report: dict[str, Any]) -> list[str]:
    """Timings per merge and round, and what secure aggregation summed."""
    lines = ["## Time", "", "| merge | round | edit vectors (s, all clients) | merge (s) | evaluation (s) |",
             "|---|---|---|---|---|"]
    for m, run in report["runs"].items():
        for r in run["rounds"]:
            s = r["seconds"]
            lines.append(f"| {m} | {r['round']} | {s.get('vectors', 0):.1f} | {s.get('merge', 0):.3f} | "
                         f"{s.get('eval', 0):.1f} |")
    lines.append("")
    if report.get("secure_aggregation"):
        lines += ["## Secure aggregation (SecAgg+)", ""]
        for s in report["secure_aggregation"]:
            at = f" layer {s['layer']}" if "layer" in s else ""
            lines.append(f"- {s['method']} round {s['round']}{at}: {s['clients']} clients, {s['values']:,} integers summed "
                         f"in {s['seconds']} s; largest distance of a sum from an integer "
                         f"{s['max_distance_from_integer']:.1e}"
                         + (f"; dropped out, not in the sum: {', '.join(s['dropped'])}" if s.get("dropped") else ""))
        lines.append("")
    if report.get("privacy"):
        p = report["privacy"]
        lines += ["## Differential privacy of the sums", "",
                  f"Gaussian mechanism per fact: noise multiplier {p['noise_multiplier']}, clipping ‖k‖ ≤ {p['clip_key']}, "
                  f"‖r‖ ≤ {p['clip_resid']}, {p['layers']} layers: μ = {p['mu']:.3g}-GDP, "
                  f"(ε, δ) = ({p['epsilon']:.3g}, {p['delta']:.0e}).", ""]
    if report.get("traffic"):
        lines += ["## Messages (Flower)", "", "| round | exchanges | messages | MB down | MB up | seconds |",
                  "|---|---|---|---|---|---|"]
        for r, t in report["traffic"]["rounds"].items():
            lines.append(f"| {r} | {t['exchanges']} | {t['messages']} | {t['bytes_down'] / 1e6:.3f} | "
                         f"{t['bytes_up'] / 1e6:.3f} | {t['seconds']:.1f} |")
        lines.append("")
    return lines


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = _keys(report)
    eff = keys[0][0]
    runs = report["runs"]
    ref = (report.get("reference") or {}).get("rounds", [])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for m, run in runs.items():
        xs = [r["round"] for r in run["rounds"]]
        a1.plot(xs, [100 * r["metrics"].get(eff, 0.0) for r in run["rounds"]], marker="o", label=m)
    if ref:
        a1.plot([r["round"] for r in ref], [100 * r["base"].get(eff, 0.0) for r in ref], "k--", marker="x",
                label="global MEMIT")
    a1.set_xlabel("round")
    a1.set_ylabel(f"{keys[0][1]} of all applied facts (%)")
    a1.set_ylim(0, 105)
    a1.set_xticks(range(1, report["rounds"] + 1))
    a1.legend(fontsize=7)
    names = list(runs) + (["global MEMIT"] if ref else [])
    vals = [runs[m]["rounds"][-1]["metrics"] if runs[m]["rounds"] else {} for m in runs] + ([ref[-1]["base"]] if ref else [])
    width = 0.8 / max(1, len(keys))
    for j, (k, label) in enumerate(keys):
        a2.bar([i + j * width for i in range(len(names))], [100 * v.get(k, 0.0) for v in vals], width=width, label=label)
    a2.set_xticks([i + width * (len(keys) - 1) / 2 for i in range(len(names))])
    a2.set_xticklabels(names, rotation=15, fontsize=8)
    a2.set_ylim(0, 105)
    a2.set_title(f"after round {report['rounds']}", fontsize=9)
    a2.legend(fontsize=7)
    fig.suptitle(f"collaborative editing · {len(report['clients'])} clients · {report.get('model', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(report: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "report.json", json.dumps(report, indent=1))
    write_text(out / "report.md", markdown(report))
    chart(report, out / "chart.png")
    return {"json": str(out / "report.json"), "md": str(out / "report.md"), "chart": str(out / "chart.png")}
