"""CollabEdit's ClientApp: one organisation. Messages (content: ConfigRecord "collab" [+ "state"]):

    query.keys     {}                               → a fresh public key (its private key stays here)
    query.seal     {keys} (to one node, the leader) → a new digest salt sealed for every other node
    query.open     {from, sealed}                   → "ok": the node opened and keeps the salt
    query.digest   {round}                          → salted digests of the round's facts
    query.prepare  {round, keep, version} + state   → counts, and one exponent per statistic
    query.stats    the same                         → its R Kᵀ, K Kᵀ (CollabEdit without SecAgg+)
    query.delta    the same                         → its own update Δᵢ (the baselines)
    train          SecAgg+ stages                   → its statistics as masked integer limbs
    evaluate       {upto, applied, version} + state → sums of per-record metrics

``state`` is the published model (the cumulative merged Δ per layer). The node's own work
and its secrets (private key, salt, DP noise seed) stay in ``context.state`` between messages
(``task`` does the work); nothing secret is ever put in a reply.

A node's settings come from its node config; ``make_client_app(node_configs=…)`` adds to it per
partition-id what a SuperNode's ``--node-config`` would hold (the simulation hands each node its
own facts this way). ``drop-at=<stage>[@<round>]`` in a node config makes the node fail at that
SecAgg+ stage (setup, share_keys, collect_masked_vectors, unmask): a deterministic dropout, for tests.
"""

from __future__ import annotations

import json
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from fedit.collab.app import task
from fedit.collab import keys
from fedit.collab.client import CollabClient, CollabError
from fedit.collab.settings import CollabSettings
from fedit.federation.flower import arrays_to_layers, to_arrays, to_tensors


SECRET = "collab.secret"  # context.state record of what the node never sends


def _node(context: Context, extra: dict[int, dict] | None) -> dict[str, Any]:
    """The node's config, with what ``extra`` adds for its partition-id."""
    cfg = dict(context.node_config)
    return {**cfg, **(extra or {}).get(int(cfg.get("partition-id", -1)), {})}


def _secret(context: Context) -> dict[str, bytes]:
    return {k: bytes(v) for k, v in context.state[SECRET].items()} if SECRET in context.state else {}


def _keep_secret(context: Context, **values: bytes) -> None:
    context.state[SECRET] = ConfigRecord({**_secret(context), **values})


def _open(context: Context, given: CollabSettings | None, extra: dict[int, dict] | None = None) -> CollabClient:
    s = task.settings_for(context.run_config, given)
    saved = None
    if "collab.meta" in context.state:
        saved = (to_tensors(context.state["collab"]), json.loads(str(context.state["collab.meta"]["json"])))
    return task.open_client(s, _node(context, extra), saved, _secret(context))


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


def _drop_mod(extra: dict[int, dict] | None):
    """A mod that fails the SecAgg+ stage named by the node's ``drop-at`` (a deterministic dropout)."""

    def mod(msg: Message, context: Context, call_next):
        at = str(_node(context, extra).get("drop-at", ""))
        cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if at and cfg is not None:
            stage, _, rnd = at.partition("@")
            if str(cfg.get(Key.STAGE, "")) == stage and (not rnd or rnd == msg.metadata.group_id):
                raise CollabError(f"this node drops out at SecAgg+ stage {at} (its node config says drop-at).",
                                  "remove drop-at from the node config.")
        return call_next(msg, context)

    return mod


def _salt_handlers(app: ClientApp) -> None:
    """The three steps of the clients' salt agreement (``collab.keys``)."""

    @app.query("keys")
    def public_key(msg: Message, context: Context) -> Message:
        """Step 1 of the salt agreement: a fresh key pair (and DP noise seed); the public key goes out."""
        import os

        sk, pk = keys.new_key_pair()
        _keep_secret(context, sk=sk, noise=os.urandom(32))
        return _reply(msg, {"public": pk.hex()})

    @app.query("seal")
    def seal(msg: Message, context: Context) -> Message:
        """Step 2, on the leader: draw the salt, seal it for every other node."""
        publics = {int(k): bytes.fromhex(v) for k, v in json.loads(str(msg.content.config_records["collab"]["keys"])).items()}
        salt, sealed = keys.seal_for_all(_secret(context)["sk"], publics)
        _keep_secret(context, salt=salt)
        return _reply(msg, {"sealed": json.dumps({str(k): v.hex() for k, v in sealed.items()})})

    @app.query("open")
    def open_salt(msg: Message, context: Context) -> Message:
        """Step 3, on every other node: open the salt the leader sealed for it."""
        cfg = msg.content.config_records["collab"]
        salt = keys.open_sealed(_secret(context)["sk"], bytes.fromhex(str(cfg["from"])), bytes.fromhex(str(cfg["sealed"])))
        _keep_secret(context, salt=salt)
        return _reply(msg, {"ok": True})


def make_client_app(settings: CollabSettings | None = None, node_configs: dict[int, dict] | None = None) -> ClientApp:
    """The ClientApp; ``settings`` None: from the run config (``flwr run``); ``node_configs``:
    partition-id → what that node's own config holds besides (see the module docstring)."""
    app = ClientApp()
    _salt_handlers(app)

    @app.query("digest")
    def digest(msg: Message, context: Context) -> Message:
        c = _open(context, settings, node_configs)
        ds = c.digests(int(msg.content.config_records["collab"]["round"]))
        _save(c, context)
        return _reply(msg, {"client": c.id, "order": int(_node(context, node_configs).get("partition-id", 0)), "keys": [d.key for d in ds], "targets": [d.target for d in ds],
                            "fingerprint": c.model.lm.identity()["fingerprint"]})

    @app.query("prepare")
    def prepare(msg: Message, context: Context) -> Message:
        c = _open(context, settings, node_configs)
        _, rnd, keep = _asked(msg, c)
        out = task.prepare(c, rnd, keep)
        _save(c, context)
        return _reply(msg, {"used": json.dumps(out["used"]), "vanished": json.dumps(out["vanished"]),
                            "seconds": float(out["seconds"]), "exponents": json.dumps(out["exponents"])})

    def tensors_reply(msg: Message, context: Context, what) -> Message:
        c = _open(context, settings, node_configs)
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
        c = _open(context, settings, node_configs)
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
        c = _open(context, settings, node_configs)
        cfg = msg.content.config_records["collab"]
        task.at_state(c, str(cfg["version"]), arrays_to_layers(msg.content.array_records.get("state")))
        applied = {int(k): v for k, v in json.loads(str(cfg["applied"])).items()}
        out = task.evaluate(c, int(cfg["upto"]), applied)
        return _reply(msg, {"metrics": json.dumps({str(k): v for k, v in out.items()})})

    @app.train(mods=[_drop_mod(node_configs), secaggplus_mod])
    def train(msg: Message, context: Context) -> Message:
        """SecAgg+'s collect stage: this client's statistics as exact integer limbs."""
        import flwr.compat.common.recorddict_compat as compat
        from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

        c = _open(context, settings, node_configs)
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
