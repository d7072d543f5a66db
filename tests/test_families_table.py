"""benchmarks/families_table.py: the Markdown rows of the every-method table, from eval reports."""

import json

from helpers import load_script


def _report(folder, method, n, batch, archive=None):
    folder.mkdir(parents=True)
    metrics = {"reliability": 0.98, "generalization": 0.5, "locality": 0.875, "portability": 0.25, "fluency": 4.5}
    pre = {"reliability": 0.1, "generalization": 0.05, "portability": 0.3, "fluency": 5.5}
    (folder / "report.json").write_text(json.dumps({
        "method": method, "n": n, "batch_size": batch, "seconds_per_edit": 1.25, "metrics": metrics,
        "metrics_pre": pre, "config": {"fluency_records": 20},
        "provenance": {"hparams": {"archive": str(archive) if archive else None}}}))


def test_rows_from_reports(tmp_path, capsys):
    editor = tmp_path / "editors" / "mend-zsre"
    editor.mkdir(parents=True)
    (editor / "editor.json").write_text(json.dumps({"training": {"steps": 300, "seconds": 1234.0,
                                                                 "dataset": "zsre"}}))
    _report(tmp_path / "ft-m", "ft-m", 100, 1)
    _report(tmp_path / "memit", "memit", 100, None)
    _report(tmp_path / "mend", "mend", 100, 1, archive=editor)
    _report(tmp_path / "ke", "ke", 100, 1, archive=tmp_path / "gone")
    load_script("families_table").main([str(tmp_path / m) for m in ("ft-m", "memit", "mend", "ke")])
    out = capsys.readouterr().out.splitlines()
    assert out[2] == ("| ft-m | fine-tuning | 100 | 1 | 98.0 | 50.0 | 87.5 | 25.0 | 4.50 (5.50, 20 gen.) | 1.2 | — "
                      "| `ft-m` |")
    assert "| memit | locate-then-edit | 100 | 100 (all) |" in out[3]
    assert "| 300 steps, 1,234 s wall, zsre train |" in out[4]
    assert "its editor.json is not here" in out[5]
    assert out[-1].startswith("Unedited on the same records: reliability 10.0, generalization 5.0")
