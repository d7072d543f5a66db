"""FedEdit on Flower: a ServerApp that drives the time slots and a ClientApp per organisation.

The apps only move messages; the work is done by the engine-neutral roles in
``federation.fededit``. Messages (all ``query.*``, content a RecordDict):

    query.setup     server → client  {}                        client → {client id, records}
    query.edit      server → client  {slot}                    client → MKVs of its slot's edits
    query.reuse     server → client  {slot} + hit MKVs         client → {applied, seconds}
    query.evaluate  server → client  {} [+ global deltas]      client → per-record metrics
    query.fedavg    server → client  {slot} + global deltas    client → its MEMIT Δ (baseline)

MKVs travel as one ArrayRecord of row-stacked tensors (``z``, ``key.<l>``, ``resid.<l>``) and a
ConfigRecord holding the per-fact metadata as JSON. A client keeps what it has edited in
``context.state`` (Flower persists it per node between messages), so any process may serve
any message. The loaded model is cached per process.

Settings come from ``[tool.flwr.app.config]`` / ``--run-config`` (deployment) or from the
factory arguments (``fedit fed run``, simulation). Node settings: ``partition-id`` and
``num-partitions`` (set by the simulation engine; pass them to each SuperNode in deployment
with ``--node-config``), or ``data-path`` for an organisation's own dataset file.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import torch  # noqa: E402

from fedit.extras import require  # noqa: E402

require("flwr", "fed")
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from fedit.federation.fededit import FedEditClient, FedEditServer, FedError, MKVBatch, average_updates, fedavg_update  # noqa: E402
from fedit.federation.settings import FedSettings, client_records  # noqa: E402

log = logging.getLogger("fedit.federation")

_MODELS: dict[tuple, Any] = {}  # loaded models and their Resources, per process
_LAST: list[FedEditClient] = []  # the client whose edits may still be on a cached model


# --- records <-> tensors ----------------------------------------------------------------
def _arrays(d: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, v.detach().cpu().contiguous()) for k, v in d.items()))


def _tensors(rec: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(rec.to_torch_state_dict()) if len(rec) else {}


def _batch_content(batch: MKVBatch, **config) -> RecordDict:
    return RecordDict({"mkvs": _arrays(batch.to_arrays()) if len(batch) else ArrayRecord(),
                       "config": ConfigRecord({**config, "meta": json.dumps(batch.meta), "n": len(batch)})})


def _batch_from(content: RecordDict, owner: str = "") -> MKVBatch:
    cfg = content["config"]
    meta = json.loads(str(cfg["meta"]))
    if int(cfg["n"]) == 0:
        return MKVBatch(torch.zeros(0, 0), [], [], owner)
    return MKVBatch.from_arrays(_tensors(content["mkvs"]), meta, owner)


# --- the client side ------------------------------------------------------------------------
def _settings(context: Context, base: FedSettings | None) -> FedSettings:
    if base is not None:
        return base
    return FedSettings.from_user_config(dict(context.run_config))


def _model(s: FedSettings):
    from fedit.models.loading import load_model

    key = (s.model, s.device, s.dtype, s.cache_dir)
    if key not in _MODELS:
        if s.threads:
            torch.set_num_threads(s.threads)
        _MODELS[key] = load_model(s.model, device=s.device or None, dtype=s.dtype or None,
                                  cache_dir=s.cache_dir or None)
    return _MODELS[key]


def _client(s: FedSettings, context: Context):
    from fedit.methods import Resources, hparams_for

    lm = _model(s)
    while _LAST:  # a message that failed half-way may have left its edits on the model
        _LAST.pop().to_base()
    nc = dict(context.node_config)
    pid, npart = int(nc.get("partition-id", 0)), int(nc.get("num-partitions", s.clients))
    cid = str(nc.get("client-id", f"client-{pid}"))
    hp = hparams_for(s.method, lm, s.hparam_overrides(), s.hparams_file or None)
    res = _MODELS.setdefault(("resources", s.cache_dir, s.corpus),
                             Resources(cache_dir=s.cache_dir or None, corpus=s.corpus or None))
    client = FedEditClient(cid, lm, hp, res, mode=s.mode, share_requests=s.share_requests, match=s.match,
                            method=s.method)
    _LAST.append(client)
    if "fededit" in context.state:
        meta = json.loads(str(context.state["fededit.meta"]["json"]))
        client.load_state({"arrays": _tensors(context.state["fededit"]), **meta})
    else:
        client.to_base()
    records = client_records(s, pid, npart, str(nc.get("data-path", "")))
    return client, records


def _save(client: FedEditClient, context: Context) -> None:
    st = client.state()
    context.state["fededit"] = _arrays(st["arrays"]) if st["arrays"] else ArrayRecord()
    meta = {k: v for k, v in st.items() if k != "arrays"}  # fact ids, report, method state's counters
    context.state["fededit.meta"] = ConfigRecord({"json": json.dumps(meta)})


def _slot_records(s: FedSettings, records, slot: int):
    from fedit.federation.partition import split_slots

    return split_slots(records, s.slots)[slot]


def make_client_app(settings: FedSettings | None = None) -> ClientApp:
    app = ClientApp()

    @app.query("setup")
    def setup(msg: Message, context: Context) -> Message:
        s = _settings(context, settings)
        client, records = _client(s, context)
        _save(client, context)
        return Message(RecordDict({"config": ConfigRecord({"client": client.id, "records": len(records),
                                                           "case_ids": json.dumps([r.case_id for r in records])})}),
                       reply_to=msg)

    @app.query("edit")
    def edit(msg: Message, context: Context) -> Message:
        s = _settings(context, settings)
        slot = int(msg.content["config"]["slot"])
        client, records = _client(s, context)
        mine = _slot_records(s, records, slot)
        ids = [f"{client.id}/{r.case_id}" for r in mine]
        batch = client.local_edit(slot, [r.request for r in mine], ids)
        _save(client, context)
        client.to_base()
        return Message(_batch_content(batch, slot=slot, client=client.id), reply_to=msg)

    @app.query("reuse")
    def reuse(msg: Message, context: Context) -> Message:
        s = _settings(context, settings)
        slot = int(msg.content["config"]["slot"])
        client, _ = _client(s, context)
        info = client.reuse(slot, _batch_from(msg.content))
        _save(client, context)
        client.to_base()
        return Message(RecordDict({"config": ConfigRecord({"json": json.dumps(info)})}), reply_to=msg)

    @app.query("fedavg")
    def fedavg(msg: Message, context: Context) -> Message:
        s = _settings(context, settings)
        slot = int(msg.content["config"]["slot"])
        client, records = _client(s, context)
        client.to_base()
        glob = _tensors(msg.content["global"]) if "global" in msg.content else {}
        applied = _apply(client.lm, glob)
        try:
            mine = _slot_records(s, records, slot)
            t0 = time.perf_counter()
            upd, t_target = fedavg_update(client.lm, client.hp, client.res, [r.request for r in mine],
                                            method=s.method)
            secs = time.perf_counter() - t0
        finally:
            if applied is not None:
                applied.revert()
        return Message(RecordDict({"update": _arrays(upd) if upd else ArrayRecord(),
                                   "config": ConfigRecord({"n": len(mine), "seconds": secs,
                                                           "target_seconds": t_target})}), reply_to=msg)

    @app.query("evaluate")
    def evaluate(msg: Message, context: Context) -> Message:
        from fedit.evaluate.runner import aggregate, measure, record_metrics

        s = _settings(context, settings)
        client, records = _client(s, context)
        lm = client.lm
        held = [a.deltas for a in client.applied]  # the client's edit, already solved by _client
        client.to_base()
        raw_pre = measure(lm, records)
        if "global" in msg.content:  # FedAvg: the averaged model
            applied = _apply(lm, _tensors(msg.content["global"]))
        else:
            client.applied = [d.apply(lm.model, check_base=False) for d in held]
            applied = None
        raw_post = measure(lm, records)
        if applied is not None:
            applied.revert()
        client.to_base()
        kind = "zsre" if s.dataset == "zsre" else "counterfact"
        pre = [record_metrics(r, None, kind) for r in raw_pre]
        post = [record_metrics(r, p, kind) for r, p in zip(raw_post, raw_pre)]
        out = {"client": client.id, "pre": aggregate(pre), "post": aggregate(post),
               "per_record": [{"case_id": r.case_id, "pre": a, "post": b} for r, a, b in zip(records, pre, post)],
               "report": client.report.to_dict()}
        return Message(RecordDict({"config": ConfigRecord({"json": json.dumps(out)})}), reply_to=msg)

    return app


def _apply(lm, deltas: dict[str, torch.Tensor]):
    if not deltas:
        return None
    from fedit.deltas import WeightDeltas

    return WeightDeltas(deltas=deltas, method="fedavg", model=lm.identity()).apply(lm.model, check_base=False)


# --- the server side ------------------------------------------------------------------------
class RunFailed(RuntimeError):
    pass


def _short(reason: str) -> str:
    """The client's own error message out of an engine's wrapped traceback."""
    import re

    found = re.findall(r"Message: (.+?)(?:\\n|\n|'>|$)", reason)
    return found[-1].strip() if found else reason.strip().splitlines()[-1][:500]


def _ask(grid: Grid, nodes: list[int], action: str, contents: dict[int, RecordDict], group: str) -> dict[int, Message]:
    msgs = [Message(contents[n], dst_node_id=n, message_type=f"query.{action}", group_id=group) for n in nodes]
    replies = list(grid.send_and_receive(msgs))
    by_node = {r.metadata.src_node_id: r for r in replies}
    errors = sorted({_short(r.error.reason) for r in by_node.values() if r.has_error()})
    missing = [n for n in nodes if n not in by_node]
    if errors or missing:
        why = "; ".join(errors) + (f" (no reply from nodes {missing})" if missing else "")
        raise RunFailed(f"clients failed at {action}: {why}")
    return by_node


def wait_for_nodes(grid: Grid, n: int, timeout: float, fail=RunFailed) -> list[int]:
    """The first ``n`` connected nodes; ``fail(message)`` is raised when fewer came in ``timeout`` s."""
    t0 = time.time()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes[:n]
        if time.time() - t0 > timeout:
            raise fail(f"only {len(nodes)} of {n} client nodes connected within {timeout:.0f} s; start one node per client.")
        time.sleep(0.5)


def _cfg(**kw) -> RecordDict:
    return RecordDict({"config": ConfigRecord(kw)})


def run_server(grid: Grid, s: FedSettings) -> dict[str, Any]:
    """The whole FedEdit run (and the FedAvg baseline if asked); writes ``<out>/federation.json``."""
    from fedit.federation.store import MKVStore

    t0 = time.perf_counter()
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    nodes = wait_for_nodes(grid, s.clients, s.node_timeout)
    setup = _ask(grid, nodes, "setup", {n: _cfg() for n in nodes}, "setup")
    cid = {n: str(setup[n].content["config"]["client"]) for n in nodes}
    if len(set(cid.values())) != len(nodes):
        raise RunFailed(f"two clients share an id: {sorted(cid.values())}; give each SuperNode its own partition-id.")
    case_ids = {cid[n]: json.loads(str(setup[n].content["config"]["case_ids"])) for n in nodes}
    store = MKVStore(s.store_path)
    server = FedEditServer(store, tau=s.tau)
    for n in nodes:
        server.register(cid[n])
    slots_log = []
    try:
        for slot in range(s.slots):
            t_slot = time.perf_counter()
            replies = _ask(grid, nodes, "edit", {n: _cfg(slot=slot) for n in nodes}, f"slot{slot}-edit")
            uploaded = {}
            for n in nodes:
                batch = _batch_from(replies[n].content, owner=cid[n])
                server.receive(cid[n], slot, batch)
                uploaded[cid[n]] = len(batch)
            hits = {n: server.hits_for(cid[n], slot) for n in nodes}
            contents = {n: _batch_content(hits[n][0], slot=slot) for n in nodes}
            replies = _ask(grid, nodes, "reuse", contents, f"slot{slot}-reuse")
            reuse = {cid[n]: json.loads(str(replies[n].content["config"]["json"])) for n in nodes}
            slots_log.append({"slot": slot, "uploaded": uploaded,
                              "hits": {cid[n]: hits[n][1] for n in nodes},
                              "reuse": reuse, "seconds": round(time.perf_counter() - t_slot, 3)})
            log.info("slot %d: uploaded %s, reused %s", slot, uploaded, {k: v["applied"] for k, v in reuse.items()})
        result: dict[str, Any] = {"settings": s.to_user_config(), "clients": [cid[n] for n in nodes],
                                  "case_ids": case_ids, "slots": slots_log, "mkvs_stored": store.count()}
        if s.evaluate:
            ev = _ask(grid, nodes, "evaluate", {n: _cfg() for n in nodes}, "evaluate")
            result["fededit"] = {cid[n]: json.loads(str(ev[n].content["config"]["json"])) for n in nodes}
        result["fededit_seconds"] = round(time.perf_counter() - t0, 3)
    finally:
        store.close()
    if s.baseline == "fedavg":
        t1 = time.perf_counter()
        glob: dict[str, torch.Tensor] = {}
        rounds = []
        for slot in range(s.slots):
            contents = {n: RecordDict({"config": ConfigRecord({"slot": slot}),
                                       **({"global": _arrays(glob)} if glob else {})}) for n in nodes}
            replies = _ask(grid, nodes, "fedavg", contents, f"fedavg{slot}")
            updates = [_tensors(replies[n].content["update"]) for n in nodes]
            avg = average_updates(updates)
            glob = {k: glob.get(k, 0) + v for k, v in avg.items()}
            rounds.append({"slot": slot, "target_seconds": {cid[n]: float(replies[n].content["config"]["target_seconds"])
                                                            for n in nodes}})
        fa: dict[str, Any] = {"rounds": rounds}
        if s.evaluate:
            contents = {n: RecordDict({"config": ConfigRecord({}), **({"global": _arrays(glob)} if glob else {})})
                        for n in nodes}
            ev = _ask(grid, nodes, "evaluate", contents, "evaluate-fedavg")
            fa["clients"] = {cid[n]: json.loads(str(ev[n].content["config"]["json"])) for n in nodes}
        fa["seconds"] = round(time.perf_counter() - t1, 3)
        result["fedavg"] = fa
    result["seconds"] = round(time.perf_counter() - t0, 3)
    tmp = out / "federation.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / "federation.json")
    return result


def make_server_app(settings: FedSettings | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        s = _settings(context, settings)
        try:
            run_server(grid, s)
        except Exception as e:  # record why, for the caller, then fail the run
            Path(s.out).mkdir(parents=True, exist_ok=True)
            (Path(s.out) / "federation.error.json").write_text(json.dumps({"error": str(e)}))
            raise

    return app


# The apps `flwr run` loads (pyproject.toml [tool.flwr.app.components]).
server_app = make_server_app()
client_app = make_client_app()

__all__ = ["make_client_app", "make_server_app", "server_app", "client_app", "run_server", "RunFailed", "FedError"]
