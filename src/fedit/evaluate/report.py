"""Write an evaluation report: report.json, report.md and chart.png (pre vs post)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedit.atomic import write_text


def _fmt(v) -> str:
    return "—" if v is None else (f"{100 * v:.1f}" if isinstance(v, float) and abs(v) <= 1.0 else f"{v:.2f}")


def markdown(report: dict[str, Any]) -> str:
    pre, post, styles = report["metrics_pre"], report["metrics"], report.get("styles", {})
    keys = report["headline"] + [k for k in sorted(post) if k not in report["headline"]]
    lines = [f"# {report['method']} on {report['dataset']} ({report['model']})", "",
             f"{report['n']} records, batch size {report['batch_size']}"
             f"{', sequential' if report['sequential'] else ', each batch reverted before the next'}; "
             f"{report['seconds_per_edit']} s per edit; peak RSS {report['peak_rss_mb']} MB"
             + (f" (target workers: {report['peak_rss_workers_mb']} MB each at most)"
                if report.get("peak_rss_workers_mb") else "")
             + (f"; peak CUDA {report['peak_cuda_mb']} MB" if report.get("peak_cuda_mb") else ""), "",
             "Rates are percentages; magnitudes are probability differences ×100; fluency is in bits.", "",
             "| metric | style | pre | post |", "|---|---|---|---|"]
    for k in keys:
        lines.append(f"| {k} | {styles.get(k, '')} | {_fmt(pre.get(k))} | {_fmt(post.get(k))} |")
    if report.get("per_batch"):
        keys_b = [k for k in ("efficacy_success", "paraphrase_success", "neighborhood_success", "score", "fluency")
                  if all(k in r["metrics"] for r in report["per_batch"])]
        lines += ["", "After each sequential batch (records edited so far; fluency on the same prompts each time):", "",
                  "| batch | edits | " + " | ".join(keys_b) + " |", "|---|---|" + "---|" * len(keys_b)]
        for r in report["per_batch"]:
            lines.append(f"| {r['batch']} | {r['edits']} | " + " | ".join(_fmt(r["metrics"][k]) for k in keys_b) + " |")
    lines += origin_lines(report)
    lines += diagnostic_lines(report)
    lines += ["", f"Consistency (RS): {report.get('consistency')}", ""]
    return "\n".join(lines)


ORIGIN_KEYS = ("efficacy_success", "paraphrase_success", "neighborhood_success")


def origin_lines(report: dict[str, Any]) -> list[str]:
    """Markdown table of a sequential run's edits by the batch they were made in (applied → final)."""
    from fedit.evaluate.runner import retention

    rows = retention(report)
    if not rows:
        return []
    keys = [k for k in ORIGIN_KEYS if any(k in (r["applied"] or r["final"] or {}) for r in rows)]

    def cell(r, k):
        a, f = (r["applied"] or {}).get(k), (r["final"] or {}).get(k)
        return f"{_fmt(a)} → {_fmt(f)}" if f is not None else _fmt(a)
    lines = ["", ("Each batch's own records, right after the batch was applied → after the last batch "
                  "(a rate that drops was forgotten; one low from the start never took; — not recorded):"), "",
             "| batch | edits | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['edits']} | " + " | ".join(cell(r, k) for k in keys) + " |")
    return lines


def diagnostic_lines(report: dict[str, Any]) -> list[str]:
    """What the layer loop did in each batch: the mean residual at the last edited layer before
    and after the edit, and the step scale each layer's update was applied with (0: rejected by
    backtracking, so that layer wrote nothing)."""
    diags = report.get("edit_diagnostics") or []
    if not diags:
        return []
    layers = diags[0]["layers"]
    lines = ["", ("Layer loop per batch (mean residual at the last edited layer before → after; step scale "
                  "each layer's update was applied with, 0 = rejected by backtracking):"), "",
             "| batch | residual | " + " | ".join(f"layer {l}" for l in layers) + " |",
             "|---|---|" + "---|" * len(layers)]
    shown = diags if len(diags) <= 12 else diags[:5] + diags[-5:]
    for i, d in enumerate(shown):
        if len(diags) > 12 and i == 5:
            lines.append(f"| … {len(diags) - 10} more | | " + " | ".join("" for _ in layers) + " |")
        r = d["residual_norms"]
        lines.append(f"| {d['batch']} | {r[0]:.3g} → {r[-1]:.3g} | " + " | ".join(f"{s:g}" for s in d["step_scales"]) + " |")
    if len(diags) > 1:
        rejected = [(l, sum(d["step_scales"][j] == 0 for d in diags)) for j, l in enumerate(layers)]
        lines += ["", "Rejected by backtracking: " + (", ".join(f"layer {l} in {k} of {len(diags)} batches"
                                                                for l, k in rejected if k) or "no layer, in no batch") + "."]
    return lines


COLOURS = ["#9aa5b1", "#2f6fdf", "#e08a2e", "#3a9a4f", "#a04fb0", "#c0392b"]


def bar_chart(path: Path, keys: list[str], runs: list[tuple[str, dict]], title: str) -> None:
    """Grouped bars: one group per metric key (rates shown as %), one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = 0.8 / max(1, len(runs))
    fig, ax = plt.subplots(figsize=(1.7 * len(keys) + 2, 3.6))
    for j, (name, vals) in enumerate(runs):
        ax.bar([x - 0.4 + w * (j + 0.5) for x in range(len(keys))], [100 * (vals.get(k) or 0.0) for k in keys],
               width=w, label=name, color=COLOURS[j % len(COLOURS)])
    ax.set_xticks(list(range(len(keys))))
    ax.set_xticklabels(keys, rotation=15, fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def batch_chart(report: dict[str, Any], path: Path) -> None:
    """Metrics after each sequential batch against the number of edits applied (fluency on the right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["per_batch"]
    xs = [r["edits"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for k in ("efficacy_success", "paraphrase_success", "neighborhood_success", "efficacy_acc", "paraphrase_acc",
              "specificity_acc"):
        if all(k in r["metrics"] for r in rows):
            ax.plot(xs, [100 * r["metrics"][k] for r in rows], marker="o", label=k)
    ax.set_xlabel("edits applied (sequential batches)")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    if all("fluency" in r["metrics"] for r in rows):
        ax2 = ax.twinx()
        ax2.plot(xs, [r["metrics"]["fluency"] for r in rows], color="black", linestyle="--", marker="x",
                 label="fluency (bits)")
        ax2.set_ylabel("fluency (n-gram entropy, bits)")
        ax2.legend(fontsize=7, loc="lower right")
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(f"{report['method']} · {report['dataset']} · batches of {report['batch_size']} · {report['model']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def chart(report: dict[str, Any], path: Path) -> None:
    keys = [k for k in report["headline"] if k != "fluency" and k in report["metrics"]]
    bar_chart(path, keys, [("pre-edit", report["metrics_pre"]), ("post-edit", report["metrics"])],
              f"{report['method']} · {report['dataset']} · n={report['n']} · {report['model']}")


def write_files(report: dict[str, Any], out_dir: str | os.PathLike, to_markdown=None, to_chart=None) -> dict[str, str]:
    """report.json, report.md and chart.png in ``out_dir`` (Markdown and chart makers given)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "report.json", json.dumps(report, indent=1))
    write_text(out / "report.md", (to_markdown or markdown)(report))
    (to_chart or chart)(report, out / "chart.png")
    return {"json": str(out / "report.json"), "md": str(out / "report.md"), "chart": str(out / "chart.png")}


def write(report: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, str]:
    files = write_files(report, out_dir)
    if report.get("per_batch"):
        batch_chart(report, Path(out_dir) / "batches.png")
        files["batches_chart"] = str(Path(out_dir) / "batches.png")
    return files
