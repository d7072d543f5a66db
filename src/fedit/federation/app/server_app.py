"""FedEdit's ServerApp: it drives the time slots (edit → store → retrieve → reuse), then the
evaluation and, if asked, the FedAvg baseline, and writes ``<out>/federation.json``.

The message types are listed in ``client_app``; the server's role (MKV store, hit rule) is
``federation.fededit.FedEditServer``. Settings come from ``[tool.flwr.app.config]`` /
``--run-config`` (deployment) or from the factory (``fedit fed run``, simulation).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedit.federation.app import task
from fedit.federation.app.messages import batch_content, batch_from
from fedit.federation.codebook import server_class
from fedit.federation.fededit import FedEditServer, average_updates
from fedit.federation.flower import RunFailed, ask, config, to_arrays, to_tensors, wait_for_nodes
from fedit.federation.settings import FedSettings

log = logging.getLogger(__name__)


def _each(nodes: list[int], **values) -> dict[int, RecordDict]:
    return {n: config(**values) for n in nodes}


def _with_global(nodes: list[int], glob: dict[str, torch.Tensor], **values) -> dict[int, RecordDict]:
    out = {}
    for n in nodes:
        out[n] = config(**values)
        if glob:
            out[n]["global"] = to_arrays(glob)
    return out


def _setup(grid: Grid, s: FedSettings) -> tuple[list[int], dict[int, str], dict[str, list]]:
    """The client nodes, their client ids and the case ids each will edit."""
    nodes = wait_for_nodes(grid, s.clients, s.node_timeout)
    setup = ask(grid, nodes, "query.setup", _each(nodes), "setup")
    cid = {n: str(setup[n]["config"]["client"]) for n in nodes}
    if len(set(cid.values())) != len(nodes):
        raise RunFailed(f"two clients share an id: {sorted(cid.values())}; give each SuperNode its own partition-id.")
    return nodes, cid, {cid[n]: json.loads(str(setup[n]["config"]["case_ids"])) for n in nodes}


def _slot(grid: Grid, nodes: list[int], cid: dict[int, str], server: FedEditServer, slot: int) -> dict[str, Any]:
    """One time slot: every client edits and uploads its MKVs, then reuses the hits it is sent."""
    t0 = time.perf_counter()
    replies = ask(grid, nodes, "query.edit", _each(nodes, slot=slot), f"slot{slot}-edit")
    uploaded = {}
    for n in nodes:
        batch = batch_from(replies[n], owner=cid[n])
        server.receive(cid[n], slot, batch)
        uploaded[cid[n]] = len(batch)
    hits = {n: server.hits_for(cid[n], slot) for n in nodes}
    replies = ask(grid, nodes, "query.reuse", {n: batch_content(hits[n][0], slot=slot) for n in nodes},
                  f"slot{slot}-reuse")
    reuse = {cid[n]: json.loads(str(replies[n]["config"]["json"])) for n in nodes}
    log.info("slot %d: uploaded %s, reused %s", slot, uploaded, {k: v["applied"] for k, v in reuse.items()})
    return {"slot": slot, "uploaded": uploaded, "hits": {cid[n]: hits[n][1] for n in nodes},
            "reuse": reuse, "seconds": round(time.perf_counter() - t0, 3)}


def _evaluate(grid: Grid, nodes: list[int], cid: dict[int, str], group: str,
              glob: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    ev = ask(grid, nodes, "query.evaluate", _with_global(nodes, glob or {}), group)
    return {cid[n]: json.loads(str(ev[n]["config"]["json"])) for n in nodes}


def _fededit(grid: Grid, s: FedSettings, nodes: list[int], cid: dict[int, str]) -> dict[str, Any]:
    """The FedEdit slots (and the evaluation); the MKV store is ``s.store_path``."""
    from fedit.federation.store import MKVStore

    t0 = time.perf_counter()
    store = MKVStore(s.store_path)
    try:
        server = server_class(s.method)(store, tau=s.tau)  # FedEditServer, or GRACE's CodebookServer
        for n in nodes:
            server.register(cid[n])
        result: dict[str, Any] = {"slots": [_slot(grid, nodes, cid, server, t) for t in range(s.slots)],
                                  "mkvs_stored": store.count()}
    finally:
        store.close()
    if s.evaluate:
        result["fededit"] = _evaluate(grid, nodes, cid, "evaluate")
    result["fededit_seconds"] = round(time.perf_counter() - t0, 3)
    return result


def _fedavg(grid: Grid, s: FedSettings, nodes: list[int], cid: dict[int, str]) -> dict[str, Any]:
    """The FedAvg baseline: per slot the mean of the clients' MEMIT Δ on the global model."""
    t0 = time.perf_counter()
    glob: dict[str, torch.Tensor] = {}
    rounds = []
    for slot in range(s.slots):
        replies = ask(grid, nodes, "query.fedavg", _with_global(nodes, glob, slot=slot), f"fedavg{slot}")
        avg = average_updates([to_tensors(replies[n]["update"]) for n in nodes])
        glob = {k: glob.get(k, 0) + v for k, v in avg.items()}
        rounds.append({"slot": slot, "target_seconds": {cid[n]: float(replies[n]["config"]["target_seconds"])
                                                        for n in nodes}})
    out: dict[str, Any] = {"rounds": rounds}
    if s.evaluate:
        out["clients"] = _evaluate(grid, nodes, cid, "evaluate-fedavg", glob)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def run_server(grid: Grid, s: FedSettings) -> dict[str, Any]:
    """The whole FedEdit run (and the FedAvg baseline if asked); writes ``<out>/federation.json``."""
    t0 = time.perf_counter()
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    nodes, cid, case_ids = _setup(grid, s)
    result: dict[str, Any] = {"settings": s.to_user_config(), "clients": [cid[n] for n in nodes], "case_ids": case_ids}
    result.update(_fededit(grid, s, nodes, cid))
    if s.baseline == "fedavg":
        result["fedavg"] = _fedavg(grid, s, nodes, cid)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    tmp = out / "federation.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / "federation.json")
    return result


def make_server_app(settings: FedSettings | None = None) -> ServerApp:
    """The ServerApp; ``settings`` None: from the run config (``flwr run``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        s = task.settings_for(context.run_config, settings)
        try:
            run_server(grid, s)
        except Exception as e:  # record why, for the caller, then fail the run
            Path(s.out).mkdir(parents=True, exist_ok=True)
            (Path(s.out) / "federation.error.json").write_text(json.dumps({"error": str(e)}))
            raise

    return app


# The app `flwr run` loads (pyproject.toml [tool.flwr.app.components]).
app = make_server_app()
