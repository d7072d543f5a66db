"""FedEdit's ClientApp: one organisation. It turns messages into ``task`` calls (all ``query.*``):

    query.setup     {}                        → {client id, number of records}
    query.edit      {slot}                    → MKVs of its slot's edits (facts named by opaque tokens)
    query.reuse     {slot} + hit MKVs         → {applied, rejected (store id, reason), seconds}
    query.evaluate  {} [+ global deltas]      → aggregate metrics (per record only if the node opts in)
    query.fedavg    {slot} + global deltas    → its MEMIT Δ (baseline)

A client keeps what it has edited in ``context.state`` (Flower keeps it per node between
messages), so any process may serve any message; the model is loaded once per process. Node
settings: ``partition-id``/``num-partitions`` (set by the simulation engine; pass them to each
SuperNode with ``--node-config``), or ``data-path`` for an organisation's own dataset file; what
the node lets out: ``share-requests``, ``share-metrics``, ``fact-key`` (``federation.privacy``).
A handler's failure reaches the server as its type and step only; the message stays in the
node's log.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedit.federation.app import task
from fedit.federation.app.messages import batch_content, batch_from
from fedit.federation.fededit import FedEditClient
from fedit.federation.flower import config, to_arrays, to_tensors
from fedit.federation.privacy import SHARE_METRICS, fact_key, fact_token, node_flag, wire_message
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


def _key(context: Context, node: dict[str, Any]) -> str:
    """The node's fact-token key: its node config's, else this run's random one (kept in its state)."""
    kept = str(context.state["fededit.key"]["hex"]) if "fededit.key" in context.state else None
    key = fact_key(node, kept)
    if kept is None:
        context.state["fededit.key"] = ConfigRecord({"hex": key})
    return key


def make_client_app(settings: FedSettings | None = None, node_config: dict[str, Any] | None = None) -> ClientApp:
    """The ClientApp; ``settings`` None: from the run config (``flwr run``). ``node_config`` is added
    to every node's own (the simulation's way to give its nodes a config; a deployment's nodes
    have theirs from ``--node-config``)."""
    app = ClientApp()

    def node(context: Context) -> dict[str, Any]:
        return {**dict(context.node_config), **(node_config or {})}

    def session(context: Context):
        s = task.settings_for(context.run_config, settings)
        return s, task.client_session(s, node(context), _saved(context))

    def private_errors(step: str) -> Callable:
        """Let a failure cross the wire as its type and step only (the message goes to the node's log)."""
        def wrap(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
            @functools.wraps(handler)
            def guarded(msg: Message, context: Context) -> Message:
                try:
                    return handler(msg, context)
                except Exception as e:  # noqa: BLE001 - every failure is reported without its text
                    raise RuntimeError(wire_message(e, step, task.client_id(node(context)))) from None
            return guarded
        return wrap

    def tokens(context: Context, client_id: str, records: list) -> list[str]:
        key = _key(context, node(context))
        return [fact_token(key, client_id, r.case_id) for r in records]

    @app.query("setup")
    @private_errors("setup")
    def setup(msg: Message, context: Context) -> Message:
        s, opened = session(context)
        with opened as (client, records):
            _save(client, context)
        return Message(config(client=client.id, records=len(records)), reply_to=msg)

    @app.query("edit")
    @private_errors("edit")
    def edit(msg: Message, context: Context) -> Message:
        s, opened = session(context)
        slot = int(msg.content["config"]["slot"])
        with opened as (client, records):
            mine = task.slot_requests(s, records, slot)
            batch = client.local_edit(slot, [r.request for r in mine], tokens(context, client.id, mine))
            _save(client, context)
        return Message(batch_content(batch, slot=slot, client=client.id), reply_to=msg)

    @app.query("reuse")
    @private_errors("reuse")
    def reuse(msg: Message, context: Context) -> Message:
        s, opened = session(context)
        with opened as (client, _):
            info = client.reuse(int(msg.content["config"]["slot"]), batch_from(msg.content))
            _save(client, context)
        return _json_reply(msg, info)

    @app.query("fedavg")
    @private_errors("fedavg")
    def fedavg(msg: Message, context: Context) -> Message:
        s, opened = session(context)
        slot = int(msg.content["config"]["slot"])
        with opened as (client, records):
            upd, info = task.fedavg_step(client, to_tensors(msg.content.get("global")),
                                         task.slot_requests(s, records, slot), s.method)
        return Message(RecordDict({"update": to_arrays(upd) if upd else ArrayRecord(), "config": ConfigRecord(info)}),
                       reply_to=msg)

    @app.query("evaluate")
    @private_errors("evaluate")
    def evaluate(msg: Message, context: Context) -> Message:
        s, opened = session(context)
        with opened as (client, records):
            facts = tokens(context, client.id, records) if node_flag(node(context), SHARE_METRICS) else None
            out = task.evaluate_step(client, records, s.dataset, to_tensors(msg.content.get("global")), facts)
        return _json_reply(msg, out)

    return app


# The app `flwr run` loads (pyproject.toml [tool.flwr.app.components]).
app = make_client_app()
