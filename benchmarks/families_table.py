"""Print the Markdown rows of the every-method table in docs/families.md from eval reports.

    python benchmarks/families_table.py runs/ft-m-zsre100 runs/memit-zsre100 ...

Each argument is the ``--out`` folder of one ``fedit eval`` run (its report.json). A row gives the
method, its family, records, batch, the EasyEdit measures in % (reliability, generalization,
locality, portability), fluency in bits with the unedited figure in brackets, seconds per edit,
the trained editor's steps and wall time when the method has one (read from the editor folder the
report names, when it is still there), and the report's folder name. The unedited line under the
table comes from the first report's ``metrics_pre``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _pct(m: dict, key: str) -> str:
    v = m.get(key)
    return "—" if v is None else f"{100 * v:.1f}"


def _training(report: dict) -> str:
    archive = (report.get("provenance", {}).get("hparams") or {}).get("archive")
    if not archive:
        return "—"
    meta = Path(archive) / "editor.json"
    if not meta.is_file():
        return f"editor {Path(archive).name} (its editor.json is not here)"
    t = json.loads(meta.read_text()).get("training", {})
    return f"{t.get('steps', '?')} steps, {t.get('seconds', 0):,.0f} s wall, {t.get('dataset', '?')} train"


def row(folder: Path, families: dict[str, str]) -> str:
    r = json.loads((folder / "report.json").read_text())
    m, pre = r["metrics"], r.get("metrics_pre", {})
    batch = r["batch_size"] if r["batch_size"] and r["batch_size"] < r["n"] else f"{r['n']} (all)"
    fl = m.get("fluency")
    fluency = "—" if fl is None else (
        f"{fl:.2f} ({pre['fluency']:.2f}, {r['config'].get('fluency_records', '?')} gen.)" if "fluency" in pre
        else f"{fl:.2f}")
    return (f"| {r['method']} | {families.get(r['method'], '?')} | {r['n']} | {batch} | {_pct(m, 'reliability')} | "
            f"{_pct(m, 'generalization')} | {_pct(m, 'locality')} | {_pct(m, 'portability')} | {fluency} | "
            f"{r['seconds_per_edit']:.1f} | {_training(r)} | `{folder.name}` |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", type=Path, help="fedit eval --out folders")
    a = ap.parse_args(argv)
    from fedit.methods import get_method, names

    families = {n: get_method(n).family for n in names()}
    print("| method | family | records | batch | reliability | generalization | locality | portability "
          "| fluency (unedited) | s / edit | training | report |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for f in a.reports:
        print(row(f, families))
    pre = json.loads((a.reports[0] / "report.json").read_text()).get("metrics_pre", {})
    print(f"\nUnedited on the same records: reliability {_pct(pre, 'reliability')}, generalization "
          f"{_pct(pre, 'generalization')}, portability {_pct(pre, 'portability')}, fluency "
          f"{pre.get('fluency', float('nan')):.2f}.")


if __name__ == "__main__":
    main()
