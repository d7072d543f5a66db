"""The FastAPI app behind ``fedit ui``: one page (static HTML + JS) and a JSON API.

Model work (edit, revert, trace) is queued as a job and answered with its id at once; the page
polls ``GET /api/jobs/{id}``. Every refusal is ``{"error": message}`` with status 400 (404 for
unknown jobs), the message of the :class:`FeditError` that names the problem and the fix; an
unexpected failure is status 500 with one line, its traceback in the server's log."""

from __future__ import annotations

import shutil
import tempfile
from importlib.resources import files
from pathlib import Path

from fastapi import Body, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask

from fedit.errors import FeditError
from fedit.ui.facts import FactSources
from fedit.ui.jobs import Jobs
from fedit.ui.reports import open_report
from fedit.ui.session import Session
from fedit.ui.store_view import browse

STATIC = Path(str(files("fedit.ui").joinpath("static")))


def _int(value, name: str, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise FeditError(f"{name} must be a whole number, got {value!r}.", f"use e.g. {default}.") from None


def create_app(session: Session, facts: FactSources | None = None, jobs: Jobs | None = None,
               report: str | None = None, store: str | None = None) -> FastAPI:
    """The app for ``session``. ``report``/``store`` prefill the report and store panels."""
    facts = facts or FactSources()
    jobs = jobs or Jobs()
    app = FastAPI(title="fedit", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(FeditError)
    async def fedit_error(_, e: FeditError):
        return JSONResponse({"error": str(e)}, status_code=400)

    @app.exception_handler(Exception)
    async def failure(_, e: Exception):  # unexpected: one line for the page, the traceback in the log
        return JSONResponse({"error": f"{type(e).__name__}: {e}"}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_, e: RequestValidationError):
        where = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        return JSONResponse({"error": f"bad request: {where}."}, status_code=400)

    @app.get("/")
    def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/api/info")
    def info():
        return {**session.info(), "sources": facts.listing(), "pending": jobs.pending(),
                "prefill": {"report": report or "", "store": store or ""}}

    @app.get("/api/facts")
    def search_facts(source: str, q: str = "", limit: int = 50):
        return facts.search(source, q, max(1, min(limit, 500)))

    @app.post("/api/edit")
    def edit(body: dict = Body(default_factory=dict)):
        probes = session.check_fact(body.get("fact"))
        method = str(body.get("method") or "")
        overrides = session.overrides_for(method, body.get("overrides"))
        job = jobs.submit("edit", lambda progress: session.edit(probes, method, overrides, progress))
        return job.status()

    @app.post("/api/revert")
    def revert():
        if not any(e.reverted is None for e in session.edits):
            raise FeditError("there is no applied edit to revert.", "edit a fact first.")
        return jobs.submit("revert", session.revert).status()

    @app.post("/api/trace")
    def trace(body: dict = Body(default_factory=dict)):
        prompt, subject = str(body.get("prompt") or ""), str(body.get("subject") or "")
        answer = str(body.get("answer") or "").strip() or None
        kind, samples = str(body.get("kind") or "mlp"), _int(body.get("samples"), "samples", 10)
        session.check_trace(prompt, subject, kind, samples)
        return jobs.submit("trace", lambda progress: session.trace(prompt, subject, answer, kind, samples,
                                                                   progress)).status()

    @app.get("/api/jobs/{job_id}")
    def job_status(job_id: str):
        job = jobs.get(job_id)
        if job is None:
            return JSONResponse({"error": f"no job {job_id!r} (the server keeps the last 50)."}, status_code=404)
        return job.status()

    @app.get("/api/edits/{edit_id}/download")
    def download(edit_id: int, format: str = "safetensors"):
        tmp = Path(tempfile.mkdtemp(prefix="fedit-ui-"))
        cleanup = BackgroundTask(shutil.rmtree, tmp, ignore_errors=True)
        try:
            out = session.save(edit_id, format, tmp)
            if out.is_dir():
                out = Path(shutil.make_archive(str(out), "zip", root_dir=out))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return FileResponse(out, filename=out.name, background=cleanup)

    @app.post("/api/report")
    def report_panel(body: dict = Body(default_factory=dict)):
        return open_report(str(body.get("folder") or ""))

    @app.post("/api/store")
    def store_panel(body: dict = Body(default_factory=dict)):
        tau = body.get("tau")
        try:
            tau = None if tau in (None, "") else float(tau)
        except (TypeError, ValueError):
            raise FeditError(f"tau must be a number, got {tau!r}.", "use e.g. 0.4.") from None
        return browse(str(body.get("path") or ""), tau)

    return app
