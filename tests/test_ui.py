"""``fedit ui``: the JSON API (in process, FastAPI's TestClient) and the page end to end in a real
headless Chromium driving a ``fedit ui`` server process on a tiny model."""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from fedit.deltas import WeightDeltas
from fedit.methods import Resources, names

from helpers import CORPUS, FAST

# A fast edit of the tiny GPT-2: few statistics, few steps, one layer.
OVERRIDES = {**FAST, "layers": [1]}
EIFFEL = {"prompt": "The {} is located in the city of", "subject": "Eiffel Tower", "target_new": "Rome",
          "target_true": "Paris", "paraphrases": "Where is the Eiffel Tower? It is in the city of",
          "neighbours": "The Colosseum is located in the city of\nThe capital of Japan is"}
HANG = 300  # seconds after which a job or page that never finishes fails the test (not a speed check)


# --- the API, in process ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm():
    from fedit.testing import tiny_model

    return tiny_model("gpt2")


@pytest.fixture
def client(lm, tmp_path):
    from fastapi.testclient import TestClient

    from fedit.ui.app import create_app
    from fedit.ui.session import Session

    session = Session(lm, defaults=OVERRIDES,
                      resources=Resources(cache_dir=str(tmp_path / "cache"), corpus=str(CORPUS)))
    with TestClient(create_app(session)) as c:
        yield c
    for e in reversed(session.edits):  # leave the shared model as it was
        e.result.applied.revert()


def wait(client, job: dict) -> dict:
    """Poll a job until it ends; returns its final status."""
    end = time.monotonic() + HANG
    while job["state"] in ("queued", "running"):
        assert time.monotonic() < end, f"job never finished: {job}"
        time.sleep(0.05)
        r = client.get(f"/api/jobs/{job['id']}")
        assert r.status_code == 200
        job = r.json()
    return job


def refused(r, *words) -> str:
    """A refusal: status 400, one error message naming the problem and the fix, no traceback."""
    assert r.status_code == 400, r.text
    msg = r.json()["error"]
    assert "Fix:" in msg and "Traceback" not in msg
    for w in words:
        assert w in msg, msg
    return msg


def test_info_lists_the_registry_methods(client):
    info = client.get("/api/info").json()
    assert [m["name"] for m in info["methods"]] == names()
    assert info["layers"] == 4 and info["model_type"] == "gpt2"
    assert "sample:counterfact" in [s["id"] for s in info["sources"]]
    page = client.get("/")
    assert page.status_code == 200 and 'id="edit-form"' in page.text
    assert client.get("/static/app.js").status_code == 200


def test_edit_revert_download(client, lm, tmp_path):
    weights = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    job = client.post("/api/edit", json={"fact": EIFFEL, "method": "rome"}).json()
    assert job["state"] in ("queued", "running", "done")
    job = wait(client, job)
    assert job["state"] == "done", job["error"]
    s = job["result"]
    assert [r["group"] for r in s["before"]] == ["prompt", "paraphrase", "neighbour", "neighbour"]
    before, after = s["before"][0], s["after"][0]
    assert after["p_new"] > before["p_new"]
    assert all(isinstance(r["generation"], str) and r["generation"] for r in s["after"])
    assert s["applied"] and s["overrides"] == OVERRIDES and s["downloadable"] and s["weight_edit"]
    changed = [n for n, p in lm.model.named_parameters() if not torch.equal(p, weights[n])]
    assert changed, "the edit is applied to the served model"

    r = client.get(f"/api/edits/{s['id']}/download")
    assert r.status_code == 200 and "edit-1-rome.safetensors" in r.headers["content-disposition"]
    (tmp_path / "e.safetensors").write_bytes(r.content)
    wd = WeightDeltas.load(tmp_path / "e.safetensors")
    assert wd.method == "rome" and wd.requests[0]["subject"] == "Eiffel Tower" and set(wd.deltas) == set(changed)

    job = wait(client, client.post("/api/revert").json())
    assert job["state"] == "done", job["error"]
    s = job["result"]
    assert not s["applied"] and s["reverted"] == s["before"]  # same numbers, same generations
    assert all(torch.equal(p, weights[n]) for n, p in lm.model.named_parameters())
    info = client.get("/api/info").json()
    assert [e["applied"] for e in info["edits"]] == [False]
    refused(client.post("/api/revert"), "no applied edit")


def test_peft_download_only_where_the_exporter_exists(client):
    from fedit.ui.session import peft_exporter

    assert client.get("/api/info").json()["peft"] == (peft_exporter() is not None)
    job = wait(client, client.post("/api/edit", json={"fact": EIFFEL, "method": "rome"}).json())
    r = client.get(f"/api/edits/{job['result']['id']}/download?format=peft")
    if peft_exporter() is None:
        refused(r, "PEFT export is not available")
    else:
        assert r.status_code == 200
        assert any(n.endswith("adapter_config.json") for n in zipfile.ZipFile(io.BytesIO(r.content)).namelist())


def test_bad_input_is_refused_with_the_message(client):
    def edit(fact=EIFFEL, **kw):
        return client.post("/api/edit", json={"fact": fact, "method": "rome", **kw})

    refused(edit({**EIFFEL, "prompt": "no subject here"}), "occurs 0 times")
    refused(edit({**EIFFEL, "target_new": " "}), "target_new")
    refused(edit(method="no-such-method"), "unknown editing method", "rome")
    refused(edit(overrides={"no_such_knob": 1}), "no_such_knob")
    refused(edit(overrides={"layers": [99]}), "do not exist")
    refused(edit(overrides=[1]), "JSON object")
    assert "bad request" in client.post("/api/edit", content=b"{not json",
                                        headers={"content-type": "application/json"}).json()["error"]
    refused(client.post("/api/trace", json={"prompt": "The {} is in", "subject": "X", "kind": "nope"}), "kind")
    refused(client.post("/api/trace", json={"prompt": "Paris is nice", "subject": "Rome"}), "does not occur")
    refused(client.get("/api/edits/41/download"), "no edit 41")
    refused(client.get("/api/facts?source=nowhere"), "unknown fact source")
    assert client.get("/api/jobs/999").status_code == 404
    assert client.get("/api/info").json()["edits"] == []  # nothing was queued


def test_unexpected_job_failure_is_one_line(client, monkeypatch):
    from fedit.ui import session as S

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(S, "measure", boom)
    job = wait(client, client.post("/api/edit", json={"fact": EIFFEL, "method": "rome"}).json())
    assert job["state"] == "error" and job["error"] == "RuntimeError: disk full"


def test_facts_from_the_shipped_samples(client):
    r = client.get("/api/facts", params={"source": "sample:counterfact", "q": "originates", "limit": 1}).json()
    assert r["total"] > r["matches"] > len(r["facts"]) == 1
    f = r["facts"][0]
    assert "{}" in f["prompt"] and f["paraphrases"] and f["neighbours"] and "originates" in f["prompt"]


def test_trace_draws_a_png(client):
    job = wait(client, client.post("/api/trace", json={"prompt": "The {} is located in", "subject": "Eiffel Tower",
                                                       "kind": "mlp", "samples": 2}).json())
    assert job["state"] == "done", job["error"]
    import base64

    assert base64.b64decode(job["result"]["png"])[:4] == b"\x89PNG"
    assert set(job["result"]["recommendation"]) >= {"rome_layer", "memit_layers"}


def write_report(folder: Path) -> None:
    """A small report folder as `fedit eval --out` writes it: report.json, report.md, chart.png."""
    from fedit.evaluate.report import chart

    report = {"method": "rome", "dataset": "counterfact", "model": "tiny", "n": 2, "headline": ["efficacy_success"],
              "metrics": {"efficacy_success": 1.0, "fluency": 6.1}, "metrics_pre": {"efficacy_success": 0.5}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report))
    (folder / "report.md").write_text("# rome on counterfact")
    chart({**report, "styles": {}}, folder / "chart.png")


def write_store(path: Path) -> None:
    """An MKV store of three clients: a and b hold the same two vectors in slot 0, c the opposite
    of one of them, and one more in slot 1; b shared one request in plain text."""
    from fedit.federation.store import MKVStore

    v = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    with MKVStore(path) as s:
        for c in ("a", "b", "c"):
            s.register_client(c, {"org": c})
        s.add("a", 0, v[:2], meta=[{"fact": "1"}, {"fact": "2"}])
        s.add("b", 0, v[:2] + 0.01, meta=[{"fact": "3", "request": {"prompt": "{} is in", "subject": "X",
                                                                   "target_new": "Y"}}, {"fact": "4"}])
        s.add("c", 0, -v[:1], meta=[{"fact": "5"}])
        s.add("c", 1, v[2:], meta=[{"fact": "6"}])


def test_report_panel(client, tmp_path):
    refused(client.post("/api/report", json={"folder": str(tmp_path)}), "no report.json")
    refused(client.post("/api/report", json={"folder": str(tmp_path / "missing")}), "not a folder")
    write_report(tmp_path)
    r = client.post("/api/report", json={"folder": str(tmp_path)}).json()
    assert r["metrics"] == [{"metric": "efficacy_success", "pre": 0.5, "post": 1.0},
                            {"metric": "fluency", "pre": None, "post": 6.1}]
    assert r["summary"]["method"] == "rome" and r["markdown"].startswith("# rome")
    assert [c["name"] for c in r["charts"]] == ["chart.png"]


def test_store_panel_reads_without_writing(client, tmp_path):
    refused(client.post("/api/store", json={"path": str(tmp_path / "none.sqlite")}), "does not exist")
    assert not (tmp_path / "none.sqlite").exists()
    path = tmp_path / "run" / "mkv.sqlite"
    write_store(path)
    files = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    r = client.post("/api/store", json={"path": str(path.parent), "tau": 0.9}).json()
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == files
    assert r["total"] == 6 and r["slots"] == [0, 1] and r["dim"] == 8
    assert {c["id"]: c["per_slot"] for c in r["clients"]} == {"a": {"0": 2, "1": 0}, "b": {"0": 2, "1": 0},
                                                               "c": {"0": 1, "1": 1}}
    # a and b hold the same vectors: each retrieves both of the other's; c's opposite vector is no hit
    assert r["hits"]["0"] == {"a": {"b": 2, "c": 0}, "b": {"a": 2, "c": 0}, "c": {"a": 0, "b": 0}}
    assert [m["request"] for m in r["mkvs"]["0"] if m["owner"] == "b"] == ["X is in", None]
    refused(client.post("/api/store", json={"path": str(path), "tau": 3}), "tau")


def test_cli_refuses_bad_arguments_before_loading(capsys):
    from fedit.cli.main import main

    assert main(["ui", "--data", "x.json"]) == 2
    assert "--dataset" in capsys.readouterr().err
    assert main(["ui", "--set", "novalue"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


# --- the page in a real browser ---------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: the UI test runs a real headless Chromium. Install it with "
                    "`apt-get update && apt-get install -y chromium chromium-driver` (as .ci/run does).")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1000"):
        opts.add_argument(a)
    # an explicit driver path: selenium-manager never looks for one on the network
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tiny_model_dir, tmp_path):
    """``fedit ui`` on the tiny model, as a user starts it; yields its URL."""
    import urllib.request

    port = _free_port()
    sets = [a for k, v in OVERRIDES.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    log = open(tmp_path / "server.log", "w")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1] / "src"),
                                                                      os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "fedit.cli.main", "ui", "--model", str(tiny_model_dir),
                             "--port", str(port), "--threads", "1", "--cache-dir", str(tmp_path / "cache"),
                             "--corpus", str(CORPUS), *sets], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    end = time.monotonic() + HANG
    while True:
        try:
            urllib.request.urlopen(url + "api/info", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > end:
                proc.kill()
                pytest.fail("fedit ui did not start:\n" + (tmp_path / "server.log").read_text())
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def test_page_edits_reverts_and_shows_errors(server, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    d = _browser()
    try:
        # the page re-renders lists and tables: an element read while it is replaced is looked up again
        until = WebDriverWait(d, HANG, poll_frequency=0.1,
                              ignored_exceptions=(StaleElementReferenceException,)).until
        d.get(server)
        until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        assert "gpt2" in d.find_element(By.ID, "model-info").text
        methods = Select(d.find_element(By.ID, "method"))
        assert [o.get_attribute("value") for o in methods.options] == names()

        # bad input: the message on the page, no traceback
        d.find_element(By.ID, "prompt").send_keys("The {} is located in the city of")
        d.find_element(By.ID, "edit-btn").click()
        error = d.find_element(By.ID, "error")
        until(lambda d: error.is_displayed())
        assert "subject" in error.text and "Fix:" in error.text and "Traceback" not in error.text

        # pick a fact from the shipped CounterFact sample: the form fills in
        Select(d.find_element(By.ID, "source")).select_by_value("sample:counterfact")
        until(lambda d: d.find_elements(By.CSS_SELECTOR, "#fact-list li"))
        d.find_element(By.ID, "fact-search").send_keys("Spike Hughes")
        until(lambda d: "Spike Hughes" in d.find_element(By.CSS_SELECTOR, "#fact-list li").text
              and len(d.find_elements(By.CSS_SELECTOR, "#fact-list li")) == 1)
        value = lambda i: d.find_element(By.ID, i).get_attribute("value")  # noqa: E731
        # clicked again if a later search answer replaced the item between finding and clicking it
        until(lambda d: d.find_element(By.CSS_SELECTOR, "#fact-list li").click() or value("subject"))
        assert (value("prompt"), value("subject"), value("target_new"), value("target_true")) == (
            "{} originates from", "Spike Hughes", "Philadelphia", "London")
        n_para, n_nb = len(value("paraphrases").splitlines()), len(value("neighbours").splitlines())
        assert n_para and n_nb

        methods.select_by_value("rome")
        d.find_element(By.ID, "edit-btn").click()
        until(lambda d: not error.is_displayed() and d.find_elements(By.CSS_SELECTOR, "#edits tbody tr"))
        assert d.find_element(By.CSS_SELECTOR, "#edits tbody tr .state").text == "applied"
        rows = d.find_elements(By.CSS_SELECTOR, "#results tbody tr")
        assert [r.get_attribute("data-group") for r in rows] == ["prompt"] + ["paraphrase"] * n_para + ["neighbour"] * n_nb

        def num(row, cls):
            return row.find_element(By.CSS_SELECTOR, f"td.{cls}").get_attribute("data-value")

        first = rows[0]
        assert float(num(first, "p-new-after")) > float(num(first, "p-new-before"))
        assert first.find_element(By.CSS_SELECTOR, "td.gen-after").text.strip()
        before = [(num(r, "p-new-before"), num(r, "p-true-before")) for r in rows]
        assert d.find_elements(By.CSS_SELECTOR, "#edits a.dl-safetensors")
        from fedit.ui.session import peft_exporter

        assert bool(d.find_elements(By.CSS_SELECTOR, "#edits a.dl-peft")) == (peft_exporter() is not None)
        d.save_screenshot(str(tmp_path / "ui-edited.png"))

        d.find_element(By.ID, "revert-btn").click()
        until(lambda d: d.find_element(By.CSS_SELECTOR, "#edits tbody tr .state").text == "reverted")
        rows = d.find_elements(By.CSS_SELECTOR, "#results tbody tr")
        assert [(num(r, "p-new-reverted"), num(r, "p-true-reverted")) for r in rows] == before
        assert not d.find_element(By.ID, "revert-btn").is_enabled()
        shot = tmp_path / "ui.png"
        d.save_screenshot(str(shot))
        assert shot.read_bytes()[:4] == b"\x89PNG"
        # the report and store panels, from folders a user would type
        write_report(tmp_path / "report")
        write_store(tmp_path / "fed" / "mkv.sqlite")
        d.find_element(By.CSS_SELECTOR, ".tab[data-panel=report]").click()
        d.find_element(By.ID, "report-folder").send_keys(str(tmp_path / "report"))
        d.find_element(By.ID, "report-btn").click()
        until(lambda d: d.find_elements(By.CSS_SELECTOR, "#report-metrics tbody tr"))
        assert [c.text for c in d.find_elements(By.CSS_SELECTOR, "#report-metrics tbody tr:first-child td")] == [
            "efficacy_success", "50.0", "100.0"]
        chart_img = d.find_element(By.CSS_SELECTOR, "#report-charts img")
        until(lambda d: d.execute_script("return arguments[0].naturalWidth", chart_img) > 0)  # the PNG decoded
        d.find_element(By.CSS_SELECTOR, ".tab[data-panel=store]").click()
        d.find_element(By.ID, "store-path").send_keys(str(tmp_path / "fed"))
        d.find_element(By.ID, "store-btn").click()
        until(lambda d: d.find_elements(By.CSS_SELECTOR, "#store-hits tbody tr"))
        hits = [[c.text for c in r.find_elements(By.CSS_SELECTOR, "th, td")]
                for r in d.find_elements(By.CSS_SELECTOR, "#store-hits tbody tr")]
        assert hits == [["a", "·", "2", "0"], ["b", "2", "·", "0"], ["c", "0", "0", "·"]]  # at the default τ 0.4
        if os.environ.get("FEDIT_UI_SCREENSHOT"):
            Path(os.environ["FEDIT_UI_SCREENSHOT"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_path / "ui-edited.png", os.environ["FEDIT_UI_SCREENSHOT"])
    finally:
        d.quit()


def test_progress_text_shows_stage_and_library_tasks():
    from fedit.ui.jobs import TextReporter

    shown = []
    rep = TextReporter(shown.append)
    rep.set_stage("computing the rome edit")
    outer = rep.open("target vectors", 20, "step", 0)
    outer.update(7)
    outer.set_postfix({"loss": "0.42"})
    assert shown[-1] == "computing the rome edit · target vectors 7/20 step, loss=0.42"
    inner = rep.open("statistics", None, "chunk", 1)
    inner.update(3)
    assert shown[-1].endswith("· statistics 3 chunk")
    inner.close()
    outer.close()
    assert shown[-1] == "computing the rome edit"


def test_library_progress_reaches_the_job():
    from fedit.ui.jobs import Jobs

    try:  # fedit.progress is where library code reports its tasks (where this fedit has it)
        from fedit import progress
    except ImportError:
        progress = None
    jobs = Jobs()

    def work(stage):
        stage("editing")
        if progress is None:
            return jobs.current.progress
        with progress.task("target vectors", total=4, unit="step") as t:
            t.update(1, loss=0.5)
            return jobs.current.progress

    job = jobs.submit("test", work)
    end = time.monotonic() + HANG
    while job.state in ("queued", "running"):
        assert time.monotonic() < end
        time.sleep(0.01)
    assert job.state == "done", job.error
    assert job.result == ("editing" if progress is None else "editing · target vectors 1/4 step, loss=0.5")


def test_generations_end_at_stop_tokens():
    from types import SimpleNamespace

    from fedit.ui.measure import stop_ids

    # Gemma 3's tokenizer converted from GGUF flags <start_of_image> as an ordinary added token
    tok = SimpleNamespace(all_special_ids=[1], get_vocab=lambda: {"<start_of_image>": 255999, "a": 5},
                          added_tokens_decoder={255998: SimpleNamespace(special=True),
                                                255999: SimpleNamespace(special=False)})
    assert stop_ids(tok) == {1, 255998, 255999}


def test_jobs_run_in_order_and_stay_listed_until_they_end():
    import threading

    from fedit.ui.jobs import Jobs

    jobs, gate = Jobs(), threading.Event()
    first = jobs.submit("edit", lambda stage: gate.wait(HANG))
    second = jobs.submit("trace", lambda stage: first.state)
    assert [j["id"] for j in jobs.pending()] == [first.id, second.id]  # a reloaded page polls these
    gate.set()
    end = time.monotonic() + HANG
    while second.state != "done":
        assert time.monotonic() < end and second.state != "error"
        time.sleep(0.01)
    assert second.result == "done" and jobs.pending() == []
