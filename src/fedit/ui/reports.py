"""Open a report folder (``fedit eval --out DIR``, also ``fed``/``collab`` runs) for the page."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from fedit.errors import FeditError

_SUMMARY = ("method", "dataset", "model", "n", "batch_size", "sequential", "seconds", "seconds_per_edit")


def open_report(folder: str) -> dict:
    """report.json's summary and metrics table, report.md's text and every PNG of the folder
    (base64, ``chart.png`` first). Raises FeditError when the folder holds no readable report."""
    d = Path(str(folder).strip()).expanduser()
    if not str(folder).strip():
        raise FeditError("give the folder of a report.", "e.g. the --out folder of `fedit eval`.")
    if not d.is_dir():
        raise FeditError(f"{d} is not a folder.", "give the --out folder that `fedit eval` wrote.")
    path = d / "report.json"
    if not path.is_file():
        raise FeditError(f"{d} holds no report.json.", "give the --out folder of a finished `fedit eval` run.")
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FeditError(f"{path} is not readable JSON ({e}).", "run `fedit eval` again to rewrite it.") from e
    if not isinstance(report, dict):
        raise FeditError(f"{path} does not hold a report object.", "give a folder written by `fedit eval`.")
    md = d / "report.md"
    pngs = sorted(d.glob("*.png"), key=lambda p: (p.name != "chart.png", p.name))
    return {"folder": str(d), "summary": {k: report[k] for k in _SUMMARY if k in report},
            "metrics": metric_rows(report), "markdown": md.read_text() if md.is_file() else "",
            "charts": [{"name": p.name, "png": base64.b64encode(p.read_bytes()).decode()} for p in pngs]}


def metric_rows(report: dict) -> list[dict]:
    """``[{"metric", "pre", "post"}]``, the report's headline metrics first; empty when the report
    has no pre/post metrics (e.g. a federation report, shown through its Markdown)."""
    post, pre = report.get("metrics"), report.get("metrics_pre") or {}
    if not isinstance(post, dict) or not isinstance(pre, dict):
        return []
    head = [k for k in report.get("headline", []) if k in post]
    keys = head + sorted(k for k in post if k not in head)
    return [{"metric": k, "pre": pre.get(k), "post": post[k]} for k in keys
            if isinstance(post[k], (int, float)) or post[k] is None]
