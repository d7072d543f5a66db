"""FedEdit's ClientApp: one organisation. It turns messages into ``task`` calls (all ``query.*``):

    query.setup     {}                        → {client id, records, case ids}
    query.edit      {slot}                    → MKVs of its slot's edits
    query.reuse     {slot} + hit MKVs         → {applied, seconds}
    query.evaluate  {} [+ global deltas]      → per-record metrics
    query.fedavg    {slot} + global deltas    → its MEMIT Δ (baseline)

A client keeps what it has edited in ``context.state`` (Flower keeps it per node between
messages), so any process may serve any message; the model is loaded once per process. Node
settings: ``partition-id``/``num-partitions`` (set by the simulation engine; pass them to each
SuperNode with ``--node-config``), or ``data-path`` for an organisation's own dataset file.
"""

from __future__ import annotations

import json
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedit.federation.app import task
from fedit.federation.app.messages import batch_content, batch_from
from fedit.federation.fededit import FedEditClient
from fedit.federation.flower import config, to_arrays, to_tensors
from fedit.federation.settings import FedSettings


def _saved(context: Context) -> dict[str, Any] | None:
    if "fededit" not in context.state:
        return None
    meta = json.loads(str(context.state["fededit.meta"]["json"]))
    return {"arrays": to_tensors(context.state["fededit"]), **meta}


def _save(client: FedEditClient, context: Context) -> None:
    st = client.state()
    context.state["fededit"] = to_arrays(st["arrays"])
    meta = {k: v for k, v in st.items() if k != "arrays"}  # fact ids, report, method state's counters
    context.state["fededit.meta"] = ConfigRecord({"json": json.dumps(meta)})


def _json_reply(msg: Message, value: Any) -> Message:
    return Message(config(json=json.dumps(value)), reply_to=msg)


def make_client_app(settings: FedSettings | None = None) -> ClientApp:
    """The ClientApp; ``settings`` None: from the run config (``flwr run``)."""
    app = ClientApp()

    def session(context: Context):
        s = task.settings_for(context.run_config, settings)
        return s, task.client_session(s, dict(context.node_config), _saved(context))

    @app.query("setup")
    def setup(msg: Message, context: Context) -> Message:
        s, opened = session(context)
        with opened as (client, records):
            _save(client, context)
        return Message(config(client=client.id, records=len(records),
                              case_ids=json.dumps([r.case_id for r in records])), reply_to=msg)

    @app.query("edit")
    def edit(msg: Message, context: Context) -> Message:
        s, opened = session(context)
        slot = int(msg.content["config"]["slot"])
        with opened as (client, records):
            mine = task.slot_requests(s, records, slot)
            batch = client.local_edit(slot, [r.request for r in mine], [f"{client.id}/{r.case_id}" for r in mine])
            _save(client, context)
        return Message(batch_content(batch, slot=slot, client=client.id), reply_to=msg)

    @app.query("reuse")
    def reuse(msg: Message, context: Context) -> Message:
        s, opened = session(context)
        with opened as (client, _):
            info = client.reuse(int(msg.content["config"]["slot"]), batch_from(msg.content))
            _save(client, context)
        return _json_reply(msg, info)

    @app.query("fedavg")
    def fedavg(msg: Message, context: Context) -> Message:
        s, opened = session(context)
        slot = int(msg.content["config"]["slot"])
        with opened as (client, records):
            upd, info = task.fedavg_step(client, to_tensors(msg.content.get("global")),
                                         task.slot_requests(s, records, slot), s.method)
        return Message(RecordDict({"update": to_arrays(upd) if upd else ArrayRecord(), "config": ConfigRecord(info)}),
                       reply_to=msg)

    @app.query("evaluate")
    def evaluate(msg: Message, context: Context) -> Message:
        s, opened = session(context)
        with opened as (client, records):
            out = task.evaluate_step(client, records, s.dataset, to_tensors(msg.content.get("global")))
        return _json_reply(msg, out)

    return app


# The app `flwr run` loads (pyproject.toml [tool.flwr.app.components]).
app = make_client_app()
