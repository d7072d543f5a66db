"""FedEdit's ServerApp: it drives the time slots (edit → store → retrieve → reuse), then the
evaluation and, if asked, the FedAvg baseline, and writes ``<out>/federation.json``.

The message types are listed in ``client_app``; the server's role (MKV store, hit rule) is
``federation.fededit.FedEditServer``. Settings come from ``[tool.flwr.app.config]`` /
``--run-config`` (deployment) or from the factory (``fedit fed run``, simulation).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedit.federation import resume
from fedit import progress
from fedit.federation.app import task
from fedit.federation.app.messages import batch_content, upload_from
from fedit.federation.codebook import server_class
from fedit.federation.fededit import FedEditServer, average_updates
from fedit.federation.flower import Roster, RunFailed, ask, config, to_arrays, to_tensors, wait_for_nodes
from fedit.federation.report import write_private
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


def _setup(grid: Grid, s: FedSettings, at_least: int = 0) -> tuple[list[int], dict[int, str]]:
    """The client nodes and their client ids (no case ids: fact ids on the wire are opaque tokens).
    ``at_least`` > 0: every node connected once that many are (a catch-up: the others' nodes may
    have gone)."""
    nodes = wait_for_nodes(grid, at_least or s.clients, s.node_timeout)
    if at_least:
        nodes = sorted(grid.get_node_ids())
    setup = ask(grid, nodes, "query.setup", _each(nodes), "setup")
    cid = {n: str(setup[n]["config"]["client"]) for n in nodes}
    if len(set(cid.values())) != len(nodes):
        raise RunFailed(f"two clients share an id: {sorted(cid.values())}; give each SuperNode its own partition-id.")
    return nodes, cid


def _slot(grid: Grid, roster: Roster, server: FedEditServer, slot: int, catching_up: bool = False) -> dict[str, Any]:
    """One time slot: every client present edits and uploads its MKVs, then reuses the hits it is
    sent. A client gone mid-slot is left out (``roster.missing``). ``catching_up``: MKVs the store
    already holds for a client and slot (uploaded before it went missing) are not stored twice."""
    t0 = time.perf_counter()
    cid = roster.ids
    replies = roster.ask(grid, "query.edit", lambda n: config(slot=slot), f"slot{slot}-edit", slot=slot)
    batches = {cid[n]: upload_from(replies[n], cid[n]) for n in replies}
    # a catch-up does not store twice what the store kept of a client from before it went missing
    kept = {c: b for c, b in batches.items() if not (catching_up and server.store.count(slot=slot, owner=c))}
    uploaded, rejected = server.receive_slot(slot, kept)
    uploaded.update({c: server.store.count(slot=slot, owner=c) for c in batches if c not in kept})
    hits = {n: server.hits_for(cid[n], slot) for n in replies}
    replies = roster.ask(grid, "query.reuse", lambda n: batch_content(hits[n][0], slot=slot), f"slot{slot}-reuse",
                         slot=slot)
    reuse = {cid[n]: json.loads(str(replies[n]["config"]["json"])) for n in replies}
    for n in replies:  # the receivers' refusals, each sender named from the server's own store
        rejected += server.senders(reuse[cid[n]].get("rejected", []), cid[n], hits[n][1])
    log.info("slot %d: uploaded %s, reused %s", slot, uploaded, {k: v["applied"] for k, v in reuse.items()})
    return {"slot": slot, "uploaded": uploaded, "hits": {cid[n]: hits[n][1] for n in replies},
            "reuse": reuse, "rejected": rejected,
            "missing": sorted(m["client"] for m in roster.missing if m.get("slot") == slot),
            "seconds": round(time.perf_counter() - t0, 3)}


def _evaluate(grid: Grid, roster: Roster, group: str, glob: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    ev = roster.ask(grid, "query.evaluate", lambda n: _with_global([n], glob or {})[n], group, slot=None)
    return {roster.ids[n]: json.loads(str(ev[n]["config"]["json"])) for n in ev}


def _fededit(grid: Grid, s: FedSettings, roster: Roster, catching_up: bool = False) -> dict[str, Any]:
    """The FedEdit slots (and the evaluation); the MKV store is ``s.store_path``."""
    from fedit.federation.store import MKVStore

    t0 = time.perf_counter()
    store = MKVStore(s.store_path)
    try:
        server = server_class(s.method)(store, tau=s.tau)  # FedEditServer, or GRACE's CodebookServer
        for n in roster.nodes:
            server.register(roster.ids[n])
        result: dict[str, Any] = {"slots": [_slot(grid, roster, server, t, catching_up)
                                            for t in progress.each(range(s.slots), "FedEdit slots", unit="slot")],
                                  "mkvs_stored": store.count()}
    finally:
        store.close()
    if s.evaluate:
        result["fededit"] = _evaluate(grid, roster, "evaluate")
    result["fededit_seconds"] = round(time.perf_counter() - t0, 3)
    return result


def _fedavg(grid: Grid, s: FedSettings, roster: Roster) -> dict[str, Any]:
    """The FedAvg baseline: per slot the mean of the present clients' MEMIT Δ on the global model."""
    t0 = time.perf_counter()
    glob: dict[str, torch.Tensor] = {}
    rounds = []
    for slot in progress.each(range(s.slots), "FedAvg baseline slots", unit="slot"):
        replies = roster.ask(grid, "query.fedavg", lambda n: _with_global([n], glob, slot=slot)[n], f"fedavg{slot}",
                             slot=slot, baseline="fedavg")
        avg = average_updates([to_tensors(replies[n]["update"]) for n in replies])
        glob = {k: glob.get(k, 0) + v for k, v in avg.items()}
        rounds.append({"slot": slot, "target_seconds": {roster.ids[n]: float(replies[n]["config"]["target_seconds"])
                                                        for n in replies}})
    out: dict[str, Any] = {"rounds": rounds}
    if s.evaluate:
        out["clients"] = _evaluate(grid, roster, "evaluate-fedavg", glob)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def _catch_up(grid: Grid, s: FedSettings) -> dict[str, Any]:
    """``resume=true``: the clients the run in ``s.out`` lists as missing redo their slots
    (``federation.resume``); the results are merged into its ``federation.json``."""
    t0 = time.perf_counter()
    previous = resume.previous_run(Path(s.out), s.to_user_config())
    wanted = resume.to_catch_up(previous)
    nodes, cid = _setup(grid, s, at_least=len(wanted))
    back = [n for n in nodes if cid[n] in wanted]
    if not back:
        raise RunFailed(f"none of the missing clients {wanted} is among the connected nodes "
                        f"({sorted(cid.values())}); start their SuperNodes again.")
    roster = Roster(back, cid)
    caught = _fededit(grid, s, roster, catching_up=True)
    result = resume.merge(previous, caught, roster.missing, [cid[n] for n in back], time.perf_counter() - t0)
    write_private(Path(s.out) / "federation.json", result)
    return result


def run_server(grid: Grid, s: FedSettings) -> dict[str, Any]:
    """The whole FedEdit run (and the FedAvg baseline if asked); writes ``<out>/federation.json``.

    A client whose node is gone mid-run is left out of the rest of it; ``missing`` lists each
    such client with the slot and step (``edit``, ``reuse``, ``evaluate``, ``fedavg``) and why."""
    if s.resume:
        return _catch_up(grid, s)
    t0 = time.perf_counter()
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    nodes, cid = _setup(grid, s)
    roster = Roster(nodes, cid)
    result: dict[str, Any] = {"settings": s.to_user_config(), "clients": [cid[n] for n in nodes]}
    result.update(_fededit(grid, s, roster))
    if s.baseline == "fedavg":
        result["fedavg"] = _fedavg(grid, s, roster)
    result["missing"] = roster.missing
    result["seconds"] = round(time.perf_counter() - t0, 3)
    write_private(out / "federation.json", result)
    return result


def make_server_app(settings: FedSettings | None = None) -> ServerApp:
    """The ServerApp; ``settings`` None: from the run config (``flwr run``)."""
    app = ServerApp()

    @app.main()
    @progress.bind  # Flower's simulation calls main from a thread of its own: report to our caller's bars
    def main(grid: Grid, context: Context) -> None:
        s = task.settings_for(context.run_config, settings)
        try:
            run_server(grid, s)
        except Exception as e:  # record why, for the caller, then fail the run
            Path(s.out).mkdir(parents=True, exist_ok=True)
            write_private(Path(s.out) / "federation.error.json", {"error": str(e)})
            raise

    return app


# The app `flwr run` loads (pyproject.toml [tool.flwr.app.components]).
app = make_server_app()
