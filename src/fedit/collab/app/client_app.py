"""CollabEdit's ClientApp: one organisation. Messages (content: ConfigRecord "collab" [+ "state"]):

    query.digest   {round}                          → salted digests of the round's facts
    query.prepare  {round, keep, version} + state   → counts, and one exponent per statistic
    query.stats    the same                         → its R Kᵀ, K Kᵀ (CollabEdit without SecAgg+)
    query.delta    the same                         → its own update Δᵢ (the baselines)
    train          SecAgg+ stages                   → its statistics as masked integer limbs
    evaluate       {upto, applied, version} + state → sums of per-record metrics

``state`` is the published model (the cumulative merged Δ per layer). The node's own work
stays in ``context.state`` between messages (``task`` does the work).
"""

from __future__ import annotations

import json
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from fedit.collab.app import task
from fedit.collab.client import CollabClient
from fedit.collab.settings import CollabSettings
from fedit.federation.flower import arrays_to_layers, to_arrays, to_tensors


def _open(context: Context, given: CollabSettings | None) -> CollabClient:
    s = task.settings_for(context.run_config, given)
    saved = None
    if "collab.meta" in context.state:
        saved = (to_tensors(context.state["collab"]), json.loads(str(context.state["collab.meta"]["json"])))
    return task.open_client(s, dict(context.node_config), saved)


def _save(c: CollabClient, context: Context) -> None:
    arrays, meta = c.export()
    context.state["collab"] = to_arrays(arrays)
    context.state["collab.meta"] = ConfigRecord({"json": json.dumps(meta)})


def _reply(msg: Message, values: dict[str, Any], arrays=None) -> Message:
    content = RecordDict({"collab": ConfigRecord(values)})
    if arrays:
        content["stats"] = to_arrays(arrays)
    return Message(content, reply_to=msg)


def _asked(msg: Message, c: CollabClient) -> tuple[dict, int, list[int]]:
    """The message's settings, after putting the published model under the client."""
    cfg = msg.content.config_records["collab"]
    task.at_state(c, str(cfg["version"]), arrays_to_layers(msg.content.array_records.get("state")))
    return cfg, int(cfg["round"]), json.loads(str(cfg.get("keep", "[]")))


def make_client_app(settings: CollabSettings | None = None) -> ClientApp:
    """The ClientApp; ``settings`` None: from the run config (``flwr run``)."""
    app = ClientApp()

    @app.query("digest")
    def digest(msg: Message, context: Context) -> Message:
        c = _open(context, settings)
        ds = c.digests(int(msg.content.config_records["collab"]["round"]))
        _save(c, context)
        return _reply(msg, {"client": c.id, "order": int(context.node_config.get("partition-id", 0)), "keys": [d.key for d in ds], "targets": [d.target for d in ds],
                            "fingerprint": c.model.lm.identity()["fingerprint"]})

    @app.query("prepare")
    def prepare(msg: Message, context: Context) -> Message:
        c = _open(context, settings)
        _, rnd, keep = _asked(msg, c)
        out = task.prepare(c, rnd, keep)
        _save(c, context)
        return _reply(msg, {"used": json.dumps(out["used"]), "vanished": json.dumps(out["vanished"]),
                            "seconds": float(out["seconds"]), "exponents": json.dumps(out["exponents"])})

    def tensors_reply(msg: Message, context: Context, what) -> Message:
        c = _open(context, settings)
        n, arrays = what(c, *_asked(msg, c)[1:])
        _save(c, context)
        return _reply(msg, {"n": n}, arrays)

    @app.query("stats")
    def stats(msg: Message, context: Context) -> Message:
        return tensors_reply(msg, context, task.stats_arrays)

    @app.query("delta")
    def delta(msg: Message, context: Context) -> Message:
        return tensors_reply(msg, context, task.own_update)

    @app.query("layer")
    def layer(msg: Message, context: Context) -> Message:
        """Layer-sequential form: the statistics at one edited layer, on the model with the merged
        layers below; with SecAgg+ only their exponents (the tensors wait for the secure sum)."""
        s = task.settings_for(context.run_config, settings)
        c = _open(context, settings)
        cfg = msg.content.config_records["collab"]
        task.at_state(c, str(cfg["layer_version"]), arrays_to_layers(msg.content.array_records.get("state")))
        n, arrays, exps = task.layer_arrays(c, str(cfg["version"]), int(cfg["round"]), json.loads(str(cfg["keep"])),
                                            int(cfg["step"]))
        context.state["collab.layer"] = to_arrays(arrays)
        context.state["collab.layer.meta"] = ConfigRecord({"n": n, "step": int(cfg["step"])})
        _save(c, context)
        return _reply(msg, {"n": n, "exponents": json.dumps(exps)}, None if s.secagg else arrays)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        c = _open(context, settings)
        cfg = msg.content.config_records["collab"]
        task.at_state(c, str(cfg["version"]), arrays_to_layers(msg.content.array_records.get("state")))
        applied = {int(k): v for k, v in json.loads(str(cfg["applied"])).items()}
        out = task.evaluate(c, int(cfg["upto"]), applied)
        return _reply(msg, {"metrics": json.dumps({str(k): v for k, v in out.items()})})

    @app.train(mods=[secaggplus_mod])
    def train(msg: Message, context: Context) -> Message:
        """SecAgg+'s collect stage: this client's statistics as exact integer limbs."""
        import flwr.compat.common.recorddict_compat as compat
        from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

        c = _open(context, settings)
        fit = compat.recorddict_to_fitins(msg.content, keep_input=True).config
        exps = json.loads(str(fit["exponents"]))
        if int(fit.get("step", -1)) >= 0:  # layer-sequential form: what query.layer measured
            meta = context.state["collab.layer.meta"]
            limbs = task.secure_layer_limbs(c, int(meta["step"]), int(meta["n"]),
                                            to_tensors(context.state["collab.layer"]), exps)
        else:
            limbs = task.secure_limbs(c, str(fit["version"]), int(fit["round"]), json.loads(str(fit["keep"])), exps)
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(limbs), num_examples=1, metrics={})
        return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)

    return app


# The app `flwr run` loads (pyproject.toml [tool.flwr.app.components]).
app = make_client_app()
