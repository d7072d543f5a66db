"""CollabEdit's ServerApp: the round loop of ``collab.rounds`` for every merge method, its
questions asked as Flower messages (``exchange``), CollabEdit's sums through SecAgg+ if asked.

The server needs the base model only for what is public: C₀ (second moments on a public
corpus), the edited layers and their shapes, λ. Deployed (``flwr run``), it writes the report to
``<out>/report.json``, ``report.md`` and ``chart.png`` (or ``<out>/collab.error.json``); made by
``fedit collab run`` (simulation) it hands the report to the caller.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedit import progress
from fedit.collab.app import task
from fedit.collab.app.exchange import FlowerExchange, privacy_of
from fedit.collab.app.traffic import CountingGrid
from fedit.collab.client import CollabError
from fedit.collab.report import summary
from fedit.collab.rounds import Solver, run_merges
from fedit.collab.secure import MAX_CLIENTS
from fedit.collab.settings import CollabSettings
from fedit.federation.flower import wait_for_nodes

log = logging.getLogger(__name__)


def _solver_and_layout(s: CollabSettings, lm=None, res=None):
    h = task.held(s, lm)
    lm, hp = h["lm"], h["hp"]
    res = res or h["res"]
    C0 = res.second_moments(lm, hp.layers, hp.mom2_samples, hp.mom2_seq_len)
    return (Solver(C0, hp.mom2_update_weight, list(hp.layers)), (list(hp.layers), {l: lm.adapter.w_out_dims(l) for l in hp.layers}),
            lm, hp)


def serve(grid: Grid, context: Context, s: CollabSettings, lm=None, res=None) -> tuple[dict[str, Any], dict]:
    """Every merge method of ``s`` over the connected client nodes; returns (report, Δ per method and round)."""
    if s.secagg and "collabedit" in s.merges and not 2 <= s.clients <= MAX_CLIENTS:
        raise CollabError(f"SecAgg+ needs 2 to {MAX_CLIENTS} clients, got {s.clients}.",
                          "run with more clients or without --secagg.")
    t0 = time.perf_counter()
    grid = CountingGrid(grid)  # messages, bytes and seconds per exchange, for the report's "traffic"
    nodes = wait_for_nodes(grid, s.clients, s.node_timeout, fail=lambda m: CollabError(m, "start one node per client."))
    solver, layout, lm, hp = _solver_and_layout(s, lm, res)
    ex = FlowerExchange(grid, context, nodes, s, layout)
    done = run_merges(ex, s.rounds, s.collab_config(), solver, say=log.info)
    clients = [ex.ids[n] for n in ex.order]
    clients += [m["client"] for m in ex.roster.missing if m["client"] not in clients]
    report = summary("flower", clients, s.rounds, s.merges, [r.to_dict() for r in done["resolutions"]], done["runs"])
    report.update(missing=ex.roster.missing, secagg=s.secagg, secure_aggregation=ex.secure_log,
                  dropped_out=ex.left_out_by_round(), privacy=privacy_of(s, len(hp.layers)), model=lm.name, dataset=s.dataset,
                  per_client=s.per_client, overlap=s.overlap, conflict=s.conflict,
                  config=s.collab_config().to_dict(), reference=None, seconds=round(time.perf_counter() - t0, 3),
                  traffic=grid.report())
    return report, done["deltas"]


def _write(s: CollabSettings, report: dict[str, Any], deltas: dict[str, list]) -> None:
    """The deployed run's report files (no reference: the server holds none of the facts) and each
    method's merged edit after the last round, ``<out>/<method>.safetensors`` (for ``fedit apply``)."""
    import dataclasses

    from fedit.deltas import WeightDeltas
    from fedit.evaluate.collab_report import write

    h = task.held(s)
    report["hparams"] = dataclasses.asdict(h["hp"])
    write(report, s.out)
    for method, per_round in deltas.items():
        if per_round and per_round[-1]:
            WeightDeltas.from_layers(h["lm"], per_round[-1], f"collab-{method}", hparams=h["hp"]).save(
                Path(s.out) / f"{method}.safetensors")


def make_server_app(settings: CollabSettings | None = None, lm=None, res=None,
                    sink: dict[str, Any] | None = None) -> ServerApp:
    """The ServerApp. With ``sink`` it leaves ``sink["report"]``/``sink["deltas"]`` (or ``sink["error"]``)
    for the caller; without, it writes the report files to the settings' ``out`` folder."""
    app = ServerApp()

    @app.main()
    @progress.bind  # Flower's simulation calls main from a thread of its own: report to our caller's bars
    def main(grid: Grid, context: Context) -> None:
        s = task.settings_for(context.run_config, settings)
        try:
            report, deltas = serve(grid, context, s, lm, res)
        except Exception as e:  # handed to the caller, who re-raises it
            log.exception("collab server failed")
            if sink is None:
                Path(s.out).mkdir(parents=True, exist_ok=True)
                (Path(s.out) / "collab.error.json").write_text(json.dumps({"error": str(e)}))
                raise
            sink["error"] = e
            return
        if sink is None:
            _write(s, report, deltas)
        else:
            sink.update(report=report, deltas=deltas)

    return app


# The app `flwr run` loads (pyproject.toml [tool.flwr.app.components]).
app = make_server_app()
