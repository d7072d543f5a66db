"""Draw several `fedit eval --sequential` reports on one chart (metrics after each batch).

    python benchmarks/compare_sequential.py out/memit-seq out/alphaedit-seq --out seq.png

Each argument is an output folder of `fedit eval --sequential`: a finished run's report.json
(with "per_batch"), or, for a run still going or stopped, its checkpoint (the batches done so
far; the legend says how many). One panel per metric: efficacy, paraphrase (generalisation) and
neighbourhood (specificity) success, and fluency; x = edits applied so far. ``--table`` also
prints the curves as a Markdown table, and each run's edits by the batch they were made in
(right after that batch → after the last one); ``--retention FILE.png`` draws that split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PANELS = [("efficacy_success", "efficacy success (%)"), ("paraphrase_success", "paraphrase success (%)"),
          ("neighborhood_success", "neighbourhood success (%)"), ("fluency", "fluency (bits)")]


def load(folder: str) -> dict:
    """A finished report, or the curve so far of a run in progress; a clear error otherwise."""
    from fedit.errors import FeditError
    from fedit.evaluate.runner import curve_so_far

    path = Path(folder) / "report.json"
    if path.exists():
        try:
            rep = json.loads(path.read_text())
        except ValueError as e:
            raise FeditError(f"{path} is not valid JSON ({e}).", "rerun the evaluation that wrote it.") from e
        if "per_batch" not in rep:
            raise FeditError(f"{path} has no per-batch curve.",
                             "run `fedit eval` with --sequential and without --final-only.")
        return rep
    return curve_so_far(folder)


def run_label(rep: dict) -> str:
    if rep.get("in_progress"):
        return f"{rep['method']} ({rep['batches_done']} of {-(-rep['n'] // rep['batch_size'])} batches)"
    return rep["method"]


def table(reports: list[dict]) -> str:
    keys = [k for k, _ in PANELS]
    head = "| run | edits | " + " | ".join(keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 2)]
    for rep in reports:
        for row in rep["per_batch"]:
            vals = [row["metrics"].get(k) for k in keys]
            cells = ["—" if v is None else (f"{v:.2f}" if k == "fluency" else f"{100 * v:.1f}")
                     for k, v in zip(keys, vals)]
            lines.append(f"| {run_label(rep)} | {row['edits']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def retention_chart(reports: list[dict], path: str) -> bool:
    """Per metric: each batch's own records right after it was applied (dashed) and at the end
    (solid), against the batch's number. False when no report has the split."""
    from fedit.evaluate.runner import retention

    splits = [(rep, retention(rep)) for rep in reports]
    splits = [(rep, rows) for rep, rows in splits if rows]
    if not splits:
        return False
    import matplotlib.pyplot as plt

    panels = PANELS[:3]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for c, (rep, rows) in enumerate(splits):
        colour = f"C{c}"
        for ax, (key, label) in zip(axes, panels):
            xs = [r["batch"] for r in rows]
            for part, style in (("applied", "--"), ("final", "-")):
                ys = [100 * r[part][key] if r[part] and key in r[part] else None for r in rows]
                if any(y is not None for y in ys):
                    ax.plot(xs, [float("nan") if y is None else y for y in ys], style, marker="o", color=colour,
                            label=f"{run_label(rep)}, {'right after its batch' if part == 'applied' else 'at the end'}")
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("batch the edits were made in", fontsize=8)
    axes[0].legend(fontsize=7)
    first = splits[0][0]
    fig.suptitle(f"{first['dataset']} · {first['model']} · each batch's own edits (batches of {first['batch_size']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", help="fedit eval output folders")
    ap.add_argument("--out", required=True, help="PNG file")
    ap.add_argument("--table", action="store_true", help="also print the curves as a Markdown table")
    ap.add_argument("--retention", metavar="PNG", help="also draw each batch's own edits: right after it, at the end")
    args = ap.parse_args(argv)
    from fedit.errors import FeditError

    try:
        reports = [load(r) for r in args.reports]
    except FeditError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.4))
    for rep in reports:
        rows = rep["per_batch"]
        xs = [r["edits"] for r in rows]
        for ax, (key, label) in zip(axes, PANELS):
            ys = [r["metrics"].get(key) for r in rows]
            if key != "fluency":
                ys = [None if y is None else 100 * y for y in ys]
            ax.plot(xs, ys, marker="o", label=run_label(rep))
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("edits applied", fontsize=8)
    axes[0].legend(fontsize=8)
    first = reports[0]
    fig.suptitle(f"{first['dataset']} · {first['model']} · sequential batches of {first['batch_size']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    if args.table:
        from fedit.evaluate.report import origin_lines

        print(table(reports))
        for rep in reports:
            lines = origin_lines(rep)
            if lines:
                print(f"\n{run_label(rep)}:" + "\n".join(lines))
    print(args.out)
    if args.retention:
        if retention_chart(reports, args.retention):
            print(args.retention)
        else:
            print("no per-batch split of the edits to draw (a one-batch run?)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
