"""The cost curve: seconds per fact and peak memory against batch size and against edits so far.

    python benchmarks/cost_curve.py --batch runs/b1 runs/b10 runs/b100 runs/b1000 \\
        --sequential runs/seq2000 --out docs/images/cost_curve.png

Each argument is the ``--out`` folder of a ``fedit eval`` run (its report.json, or the
checkpoint of a sequential run still going). ``--batch`` runs edit all their records in one
batch (or in batches of one size: the mean over the batches is taken); ``--sequential`` runs
keep their batches applied, and each batch is a point at the number of edits made before and
with it. A point's seconds per fact are the batch's edit seconds (targets, keys, statistics,
solves; not the measurement) over its edits; its memory is the process's peak RSS when the
batch was done (``batch_costs`` in the report). Batches whose targets came from a target cache
are left out, since their optimisation time is not in their seconds, and so are batches named
with ``--exclude RUN:BATCH`` (a batch known to be disturbed, e.g. its process paused by hand).
Prints a Markdown table of the points and draws both curves into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _load(folder: Path) -> dict:
    for p in (folder / "report.json", folder / "checkpoint" / "progress.json"):
        if p.is_file():
            doc = json.loads(p.read_text())
            doc.setdefault("method", doc.get("signature", {}).get("method", "?"))  # a checkpoint: its signature
            return doc
    raise SystemExit(f"error: {folder} has neither report.json nor checkpoint/progress.json")


def _costs(doc: dict, folder: Path) -> list[dict]:
    costs = [c for c in doc.get("batch_costs", []) if not c.get("targets_from_cache")]
    if not costs:
        raise SystemExit(f"error: {folder}'s report has no batch_costs with targets optimised in the run "
                         "(written by fedit eval since 2026-12-02; run without --target-cache).")
    return costs


def batch_points(folders: list[Path]) -> list[dict]:
    out = []
    for f in folders:
        doc = _load(f)
        costs = _costs(doc, f)
        size = costs[0]["edits"]
        secs = sum(c["edit_seconds"] for c in costs) / sum(c["edits"] for c in costs)
        out.append({"run": f.name, "method": doc.get("method"), "batch": size, "batches": len(costs),
                    "s_per_fact": round(secs, 3), "peak_rss_mb": max(c["peak_rss_mb"] for c in costs)})
    return sorted(out, key=lambda p: p["batch"])


def sequential_points(folders: list[Path], exclude: set[tuple[str, int]] = frozenset()) -> list[dict]:
    out = []
    for f in folders:
        doc = _load(f)
        done = 0
        for c in doc.get("batch_costs", []):
            done += c["edits"]
            if c.get("targets_from_cache") or (f.name, c["batch"]) in exclude:
                continue
            out.append({"run": f.name, "method": doc.get("method"), "edits_so_far": done, "batch": c["edits"],
                        "s_per_fact": round(c["edit_seconds"] / c["edits"], 3), "peak_rss_mb": c["peak_rss_mb"]})
        if not any(p["run"] == f.name for p in out):
            _costs(doc, f)  # raises the explanation
    return out


def draw(batch: list[dict], seq: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, pts, x, title in ((axes[0], batch, "batch", "against batch size (one batch)"),
                              (axes[1], seq, "edits_so_far", "against edits so far (sequential batches)")):
        ax.set_title(title)
        if not pts:
            ax.text(0.5, 0.5, "no runs given", ha="center", va="center", transform=ax.transAxes, color="grey")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        ax.set_xlabel("facts in the batch" if x == "batch" else "edits so far")
        ax.set_ylabel("seconds per fact")
        if x == "batch":
            ax.set_xscale("log")
        ax2 = ax.twinx()
        ax2.set_ylabel("peak RSS (MB)", color="tab:red")
        for run in dict.fromkeys(p["run"] for p in pts) if x == "edits_so_far" else [None]:
            sel = [p for p in pts if run is None or p["run"] == run]
            label = sel[0]["method"] + (f" ({run})" if run else "") if sel else ""
            ax.plot([p[x] for p in sel], [p["s_per_fact"] for p in sel], "o-", label=label)
            ax2.plot([p[x] for p in sel], [p["peak_rss_mb"] for p in sel], "s--", color="tab:red", alpha=0.6)
        if pts:
            ax.legend(loc="upper left", fontsize=8)
        ax.set_ylim(bottom=0)
        ax2.set_ylim(bottom=0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", nargs="*", default=[], help="eval folders, one batch size each")
    ap.add_argument("--sequential", nargs="*", default=[], help="eval folders of sequential runs")
    ap.add_argument("--exclude", action="append", default=[], metavar="RUN:BATCH",
                    help="leave out batch BATCH of the sequential run in folder RUN (its name), e.g. one "
                         "whose process was paused; repeatable")
    ap.add_argument("--out", default="cost_curve.png", help="chart file (default cost_curve.png)")
    ap.add_argument("--json", action="store_true", help="print the points as one JSON object")
    args = ap.parse_args(argv)
    if not args.batch and not args.sequential:
        ap.error("give --batch and/or --sequential folders")
    exclude = set()
    for item in args.exclude:
        run, _, b = item.rpartition(":")
        if not run or not b.isdigit():
            ap.error(f"--exclude {item!r}: expected RUN:BATCH, e.g. seq2000-memit:6")
        exclude.add((run, int(b)))
    try:
        batch = batch_points([Path(f) for f in args.batch])
        seq = sequential_points([Path(f) for f in args.sequential], exclude)
    except SystemExit as e:
        sys.stderr.write(f"{e}\n")
        return 2
    draw(batch, seq, Path(args.out))
    if args.json:
        print(json.dumps({"batch": batch, "sequential": seq}))
        return 0
    print("| method | batch | s / fact | peak RSS (MB) | run |\n|---|---|---|---|---|")
    for p in batch:
        print(f"| {p['method']} | {p['batch']:,} | {p['s_per_fact']:.2f} | {p['peak_rss_mb']:,.0f} | `{p['run']}` |")
    if seq:
        print("\n| method | edits so far | batch | s / fact | peak RSS (MB) | run |\n|---|---|---|---|---|---|")
        for p in seq:
            print(f"| {p['method']} | {p['edits_so_far']:,} | {p['batch']} | {p['s_per_fact']:.2f} | "
                  f"{p['peak_rss_mb']:,.0f} | `{p['run']}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
