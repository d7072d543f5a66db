"""benchmarks/cost_curve.py: points from the reports' per-batch costs, a chart, and clear refusals."""

import json

from helpers import load_script


def _report(folder, method, costs):
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps({"method": method, "batch_costs": costs}))
    return str(folder)


def test_cost_curve_points_table_and_chart(tmp_path, capsys):
    c = lambda b, n, s, rss, cached=0: {"batch": b, "edits": n, "edit_seconds": s, "peak_rss_mb": rss,  # noqa: E731
                                         "targets_from_cache": cached}
    b1 = _report(tmp_path / "b1", "memit", [c(1, 1, 4.0, 900), c(2, 1, 2.0, 950)])
    b100 = _report(tmp_path / "b100", "memit", [c(1, 100, 150.0, 1500)])
    seq = _report(tmp_path / "seq", "alphaedit", [c(1, 100, 120.0, 1400), c(2, 100, 5.0, 1400, cached=100),
                                                  c(3, 100, 140.0, 1600)])
    script = load_script("cost_curve")
    out = tmp_path / "curve.png"
    assert script.main(["--batch", b100, b1, "--sequential", seq, "--out", str(out), "--json"]) == 0
    pts = json.loads(capsys.readouterr().out)
    assert [(p["batch"], p["s_per_fact"], p["peak_rss_mb"]) for p in pts["batch"]] == [(1, 3.0, 950), (100, 1.5, 1500)]
    # the batch whose targets came from a cache is not a point; edits so far still count it
    assert [(p["edits_so_far"], p["s_per_fact"]) for p in pts["sequential"]] == [(100, 1.2), (300, 1.4)]
    assert out.stat().st_size > 1000
    # a batch named with --exclude (e.g. its process was paused) is not a point either
    assert script.main(["--sequential", seq, "--exclude", "seq:3", "--out", str(out), "--json"]) == 0
    assert [p["edits_so_far"] for p in json.loads(capsys.readouterr().out)["sequential"]] == [100]
    assert script.main(["--batch", b1, "--out", str(out)]) == 0
    assert "| memit | 1 | 3.00 | 950 | `b1` |" in capsys.readouterr().out
    # a run still going: its checkpoint, whose method is in its signature
    ck = tmp_path / "going" / "checkpoint"
    ck.mkdir(parents=True)
    (ck / "progress.json").write_text(json.dumps({"signature": {"method": "memit"}, "model_name": "gemma-3-270m",
                                                  "batch_costs": [c(1, 100, 300.0, 4000)]}))
    assert script.main(["--sequential", str(tmp_path / "going"), "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sequential"][0]["method"] == "memit"
    old = _report(tmp_path / "old", "memit", [])
    assert script.main(["--batch", old, "--out", str(out)]) == 2
    assert "no batch_costs" in capsys.readouterr().err
    assert script.main(["--batch", str(tmp_path / "none"), "--out", str(out)]) == 2
