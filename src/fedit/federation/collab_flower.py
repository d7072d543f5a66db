"""CollabEdit on Flower: a ServerApp that merges and a ClientApp that edits (Message API, flwr 1.41).

Per round and merge method the server sends, to every client:

1. ``query.digest``   → salted digests of the round's facts (``collab.protocol``); the server
                        resolves overlaps and conflicts.
2. ``query.prepare``  → the client edits the facts it may keep on the published model (sent
                        along as the cumulative Δ) and answers with counts and, for SecAgg+,
                        one exponent per statistic tensor. Nothing else leaves the client.
3. CollabEdit: the sums Σ RᵢKᵢᵀ and Σ KᵢKᵢᵀ, either through Flower's SecAgg+ (``secagg``: the
   server only ever holds the masked sum) or plainly (``query.stats``: per-client statistics).
   Baselines: ``query.delta`` → each client's own update Δᵢ (TIES needs them one by one).
4. ``evaluate``       → the client measures its applied facts on the merged model and returns
                        sums of per-record metrics.

Settings reach the apps through the factories (closures); a client process loads the model once
and serves every node it hosts (all nodes see the same published model). The report has the
shape of ``fedit.collab.run_collab``'s.

SecAgg+ in flwr 1.41 exists only in the legacy stack: the client mod is
``flwr.client.mod.secaggplus_mod`` (it wraps ``train`` messages and expects the legacy
FitIns/FitRes layout inside them) and the server side is ``flwr.server.workflow.SecAggPlusWorkflow``,
which needs a ``LegacyContext`` with a Strategy and a ClientManager. We drive that workflow from
our Message-API ServerApp for the one step that needs it, with a small Strategy that hands over
the summed vector. Its quantiser is made exact by ``fedit.collab.secure``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from fedit.collab.client import CollabClient, CollabError, ModelState
from fedit.collab.driver import round_entry
from fedit.collab.merge import MergeConfig, MergeError, solve, sum_stats
from fedit.collab.protocol import FactDigest, resolve
from fedit.collab.secure import CLIP, LEVELS, MAX_CLIENTS, MODULUS, NO_EXPONENT, decode, encode, exponents
from fedit.collab.state import CollabState
from fedit.extras import require
from fedit.methods.vectors import LayerStats

require("flwr", "collab")  # every app here runs on Flower: the [collab] extra
log = logging.getLogger(__name__)


@dataclass
class CollabClientSettings:
    """What every ClientApp process needs. ``plan`` maps client ids to their facts per round;
    node ``partition-id`` i plays ``list(plan)[i]`` (in a deployment a node would read only its own)."""

    model: str
    plan: dict[str, list[list]]
    salt: bytes = field(repr=False)
    device: str | None = None
    dtype: str | None = None
    cache_dir: str | None = None
    corpus: str | None = None
    threads: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    hparams_file: str | None = None
    residual_tol: float = 1e-6
    dataset: str = "counterfact"


@dataclass
class CollabServerSettings:
    clients: int
    rounds: int
    layers: list[int]
    shapes: dict[int, tuple[int, int]]  # layer -> (d_out, d_in) of W_out
    lam: float
    moments: Callable[[], dict[int, torch.Tensor]]  # C₀ per layer (public: base model + public corpus)
    merges: tuple[str, ...] = ("collabedit",)
    conflict_policy: str = "reject"
    priority: list[str] | None = None
    ties_density: float = 0.2
    ties_scale: float = 0.4
    c1: bool = True
    c1_weight: float = 1.0
    secagg: bool = False
    secagg_shares: float = 1.0  # fraction of the other clients each client shares its secrets with
    secagg_threshold: float = 0.67  # fraction of shares that reconstruct a dropped client's secret
    timeout: float | None = None


# --- payloads -------------------------------------------------------------------------------
def _arrays(tensors: dict[str, torch.Tensor]):
    from collections import OrderedDict

    from flwr.app import ArrayRecord

    if not tensors:
        return ArrayRecord()
    return ArrayRecord(OrderedDict((k, v.detach().cpu().contiguous()) for k, v in tensors.items()))


def _tensors(record) -> dict[str, torch.Tensor]:
    return {k: v for k, v in record.to_torch_state_dict().items()} if record is not None and len(record) else {}


def _delta_to_arrays(delta: dict[int, torch.Tensor]):
    return _arrays({str(l): d.double() for l, d in delta.items()})


def _arrays_to_delta(record) -> dict[int, torch.Tensor]:
    return {int(k): v.double() for k, v in _tensors(record).items()}


# --- the client -----------------------------------------------------------------------------
# What a client process holds between messages, per app instance (token): the loaded model, the
# published state it carries, and the clients it plays (with their cached edit vectors). The
# simulation engine unpickles the ClientApp for every message, so a closure cannot hold them;
# ``release`` frees an entry.
_HELD: dict[str, dict[str, Any]] = {}


def release(token: str | None = None) -> None:
    """Forget what this process holds for app ``token`` (all apps when None)."""
    if token is None:
        _HELD.clear()
    else:
        _HELD.pop(token, None)


def collab_client_app(settings: CollabClientSettings):
    """A ClientApp that plays client ``list(settings.plan)[partition-id]``."""
    import uuid

    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp

    token = uuid.uuid4().hex
    ids = list(settings.plan)

    def held() -> dict[str, Any]:
        # Imported, not captured: a pickled closure would carry a copy of _HELD, not this process's.
        from fedit.federation import collab_flower as this_module

        return this_module._HELD.setdefault(token, {})

    def client_for(context: Context) -> CollabClient:
        h = held()
        if "lm" not in h:
            from fedit.methods import Resources, hparams_for
            from fedit.models.loading import load_model

            if settings.threads:
                torch.set_num_threads(settings.threads)
            lm = load_model(settings.model, device=settings.device, dtype=settings.dtype, cache_dir=settings.cache_dir)
            hp = dataclasses.replace(hparams_for("memit", lm, settings.overrides, settings.hparams_file), form="base")
            h.update(lm=lm, state=ModelState(lm), hp=hp, clients={},
                        res=Resources(cache_dir=settings.cache_dir, corpus=settings.corpus))
        pid = int(context.node_config.get("partition-id", -1))
        if not 0 <= pid < len(ids):
            raise CollabError(f"node {context.node_id} has partition-id {pid}, the plan has {len(ids)} clients.",
                              "start one node per client, with partition-id 0..N-1.")
        cid = ids[pid]
        if cid not in h["clients"]:
            c = CollabClient(cid, h["state"], h["hp"], h["res"], settings.plan[cid], settings.salt,
                             settings.residual_tol, settings.dataset)
            h["state"].reset()
            c.pre_scores()
            h["clients"][cid] = c
        return h["clients"][cid]

    def at_state(msg: Message) -> None:
        cfg = msg.content.config_records["collab"]
        held()["state"].set(str(cfg["version"]), _arrays_to_delta(msg.content.array_records.get("state")))

    def reply(msg: Message, cfg: dict[str, Any], arrays: dict[str, torch.Tensor] | None = None) -> Message:
        content = RecordDict({"collab": ConfigRecord(cfg)})
        if arrays:
            content["stats"] = _arrays(arrays)
        return Message(content, reply_to=msg)

    def prepared(msg: Message, c: CollabClient):
        cfg = msg.content.config_records["collab"]
        at_state(msg)
        return c.prepare(int(cfg["round"]), json.loads(str(cfg["keep"])))

    app = ClientApp()

    @app.query("digest")
    def digest(msg: Message, context: Context) -> Message:
        c = client_for(context)
        ds = c.digests(int(msg.content.config_records["collab"]["round"]))
        return reply(msg, {"client": c.id, "order": ids.index(c.id), "keys": [d.key for d in ds],
                           "targets": [d.target for d in ds], "base": held()["lm"].identity()["fingerprint"]})

    @app.query("prepare")
    def prepare(msg: Message, context: Context) -> Message:
        c = client_for(context)
        p = prepared(msg, c)
        recs = c.round_records(int(msg.content.config_records["collab"]["round"]))
        layers, shapes = held()["hp"].layers, _shapes(held()["lm"], held()["hp"].layers)
        return reply(msg, {"used": json.dumps(p.used), "vanished": json.dumps([recs[i].request.case_id for i in p.vanished]),
                           "seconds": float(p.seconds), "exponents": json.dumps(exponents(p.stats(), layers, shapes))})

    @app.query("stats")
    def stats(msg: Message, context: Context) -> Message:
        c = client_for(context)
        p = prepared(msg, c)
        st = p.stats()
        arrays = {**{f"rk.{l}": s.RK for l, s in st.items()}, **{f"kk.{l}": s.KK for l, s in st.items()}}
        return reply(msg, {"n": p.n}, arrays)

    @app.query("delta")
    def delta(msg: Message, context: Context) -> Message:
        c = client_for(context)
        p = prepared(msg, c)
        st = p.stats()
        if not st:
            return reply(msg, {"n": 0})
        hp, lm = held()["hp"], held()["lm"]
        C0 = held()["res"].second_moments(lm, hp.layers, hp.mom2_samples, hp.mom2_seq_len)
        d = solve(st, C0, hp.mom2_update_weight)
        return reply(msg, {"n": p.n}, {f"d.{l}": v for l, v in d.items()})

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        c = client_for(context)
        cfg = msg.content.config_records["collab"]
        at_state(msg)
        applied = {int(k): v for k, v in json.loads(str(cfg["applied"])).items()}
        c.kept = applied
        out = c.evaluate(int(cfg["upto"]))
        return reply(msg, {"metrics": json.dumps({str(k): v for k, v in out.items()})})

    @app.train(mods=[secaggplus_mod])
    def train(msg: Message, context: Context) -> Message:
        """SecAgg+'s collect stage: this client's statistics as exact integer limbs."""
        import flwr.compat.common.recorddict_compat as compat
        from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

        c = client_for(context)
        fit = compat.recorddict_to_fitins(msg.content, keep_input=True).config
        version, rnd, keep = str(fit["version"]), int(fit["round"]), json.loads(str(fit["keep"]))
        if held()["state"].version != version:
            raise CollabError(f"secure sum for model state {version!r}, but this client prepared "
                              f"{held()['state'].version!r}.",
                              "send query.prepare before the secure sum.")
        p = c.prepare(rnd, keep)
        layers = held()["hp"].layers
        limbs = encode(p.stats(), layers, _shapes(held()["lm"], layers), json.loads(str(fit["exponents"])))
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(limbs), num_examples=1, metrics={})
        return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)

    return app


def _shapes(lm, layers: list[int]) -> dict[int, tuple[int, int]]:
    """(d_out, d_in) of W_out per layer."""
    return {l: lm.adapter.w_out_dims(l) for l in layers}


# --- the server -----------------------------------------------------------------------------
def collab_server_app(settings: CollabServerSettings, sink: dict[str, Any]):
    """A ServerApp that runs every merge method of ``settings`` and leaves the report in ``sink``
    (``sink["report"]``, or ``sink["error"]`` with the exception)."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        try:
            sink["report"] = _serve(grid, context, settings)
        except Exception as e:  # noqa: BLE001 - handed to the caller, which re-raises it
            log.exception("collab server failed")
            sink["error"] = e

    return app


def _ask(grid, nodes: list[int], kind: str, cfg: dict[str, Any] | Callable[[int], dict[str, Any]],
         arrays=None, group: str = "") -> dict[int, Any]:
    from flwr.app import ConfigRecord, Message, RecordDict

    msgs = []
    for nid in nodes:
        content = RecordDict({"collab": ConfigRecord(cfg(nid) if callable(cfg) else cfg)})
        if arrays is not None:
            content["state"] = arrays
        msgs.append(Message(content=content, dst_node_id=nid, message_type=kind, group_id=group))
    replies = list(grid.send_and_receive(msgs))
    out = {}
    for r in replies:
        if r.has_error():
            raise CollabError(f"client node {r.metadata.src_node_id} failed on {kind}: {r.error.reason}",
                              "see the client's log above.")
        out[r.metadata.src_node_id] = r.content
    missing = set(nodes) - set(out)
    if missing:
        raise CollabError(f"no reply to {kind} from node(s) {sorted(missing)}.", "check that every node is running.")
    return out


def _serve(grid, context, s: CollabServerSettings) -> dict[str, Any]:
    if s.secagg and "collabedit" in s.merges and not 2 <= s.clients <= MAX_CLIENTS:
        raise CollabError(f"SecAgg+ needs 2 to {MAX_CLIENTS} clients, got {s.clients}.",
                          "run with more clients or without --secagg.")
    t_all = time.perf_counter()
    from fedit.federation.flower_apps import wait_for_nodes

    nodes = wait_for_nodes(grid, s.clients, 120.0, fail=lambda msg: CollabError(msg, "check that every node is running."))
    C0 = s.moments()
    runs, resolutions, secure_log = {}, [], []
    ids: dict[int, str] = {}
    order: list[int] = nodes
    for method in s.merges:
        st = CollabState()
        mcfg = MergeConfig(method, s.ties_density, s.ties_scale)
        applied: dict[str, dict[int, list[int]]] = {}
        rounds, deltas_by_round = [], []
        for t in range(s.rounds):
            t0 = time.perf_counter()
            got = _ask(grid, nodes, "query.digest", {"round": t}, group=f"{method}-{t}")
            ids = {nid: str(r.config_records["collab"]["client"]) for nid, r in got.items()}
            bases = {str(r.config_records["collab"]["base"]) for r in got.values()}
            if len(bases) != 1:
                raise CollabError(f"clients hold different base models (fingerprints {sorted(bases)}).",
                                  "every client must start from the same base model.")
            order = sorted(nodes, key=lambda nid: int(got[nid].config_records["collab"]["order"]))
            subs = {ids[nid]: [FactDigest(str(k), str(v)) for k, v in zip(got[nid].config_records["collab"]["keys"],
                                                                            got[nid].config_records["collab"]["targets"])]
                    for nid in order}
            res = resolve(subs, s.conflict_policy, s.priority, st.applied)
            if len(resolutions) < s.rounds:
                resolutions.append(res.to_dict())
            state_arrays = _delta_to_arrays(st.delta)

            def base_cfg(nid, _t=t, _res=res, _v=st.version):
                return {"round": _t, "keep": json.dumps(_res.keep[ids[nid]]), "version": _v}

            prep = _ask(grid, nodes, "query.prepare", base_cfg, state_arrays, group=f"{method}-{t}")
            pc = {nid: r.config_records["collab"] for nid, r in prep.items()}
            used = {ids[nid]: json.loads(str(c["used"])) for nid, c in pc.items()}
            n_total = sum(len(u) for u in used.values())
            t1 = time.perf_counter()
            total: dict[int, LayerStats] = {}
            delta: dict[int, torch.Tensor] = {}
            if n_total:
                if method == "collabedit":
                    if s.secagg:
                        exps = _max_exponents([json.loads(str(c["exponents"])) for c in pc.values()])
                        total, info = _secure_sum(grid, context, nodes, t, s, base_cfg, exps, n_total)
                        secure_log.append({"method": method, "round": t + 1, **info})
                    else:
                        got = _ask(grid, nodes, "query.stats", base_cfg, state_arrays, group=f"{method}-{t}")
                        total = sum_stats([_stats_of(r) for r in got.values()])
                    delta = solve(total, C0, s.lam, st.C1 if s.c1 else None)
                else:
                    got = _ask(grid, nodes, "query.delta", base_cfg, state_arrays, group=f"{method}-{t}")
                    deltas = [{int(k[2:]): v.double() for k, v in _tensors(r.array_records.get("stats")).items()}
                              for r in got.values()]
                    counts = [int(r.config_records["collab"]["n"]) for r in got.values()]
                    try:
                        delta = _merge_deltas(mcfg, deltas, counts)
                    except MergeError:
                        delta = {}
            t_merge = time.perf_counter() - t1
            facts = {}
            for c, ds in subs.items():
                for i in res.keep[c]:
                    facts[ds[i].key] = ds[i].target
            st.apply(delta, total or None, facts, c1=s.c1 and method == "collabedit", c1_weight=s.c1_weight,
                     version=f"{method}@{t + 1}")
            for c in subs:
                applied.setdefault(c, {})[t] = used[c] if delta else []
            t2 = time.perf_counter()
            ev = _ask(grid, nodes, "evaluate",
                      lambda nid, _t=t: {"version": st.version, "upto": _t,
                                         "applied": json.dumps({str(k): v for k, v in applied[ids[nid]].items()})},
                      _delta_to_arrays(st.delta), group=f"{method}-{t}")
            evals = {ids[nid]: {int(k): v for k, v in json.loads(str(r.config_records["collab"]["metrics"])).items()}
                     for nid, r in ev.items()}
            counts = {ids[nid]: {"submitted": len(subs[ids[nid]]), "kept": len(res.keep[ids[nid]]),
                                 "used": len(used[ids[nid]]), "vanished": json.loads(str(c["vanished"])),
                                 "seconds": round(float(c["seconds"]), 3)} for nid, c in pc.items()}
            counts = {c: counts[c] for c in subs}
            t_vec = sum(v["seconds"] for v in counts.values())
            secs = {"vectors": t_vec, "merge": t_merge, "eval": time.perf_counter() - t2, "round": time.perf_counter() - t0}
            rounds.append(round_entry(t, counts, evals, secs,
                                      {"delta_norm": {str(l): float(d.norm()) for l, d in st.delta.items()}}))
            deltas_by_round.append({l: d.clone() for l, d in st.delta.items()})
        runs[method] = {"method": method, "rounds": rounds, "final": rounds[-1]["metrics"] if rounds else {},
                        "_deltas": deltas_by_round}  # cumulative Δ per round; not JSON, the caller drops it
    return {"kind": "collab", "engine": "flower", "secagg": s.secagg, "clients": [ids[n] for n in order],
            "rounds": s.rounds, "merges": list(s.merges), "resolution": resolutions,
            "duplicates_total": sum(r["n_duplicates"] for r in resolutions),
            "conflicts_total": sum(r["n_conflicts"] for r in resolutions),
            "rejected_total": sum(r["n_rejected"] for r in resolutions),
            "runs": runs, "secure_aggregation": secure_log, "seconds": round(time.perf_counter() - t_all, 3)}


def _stats_of(content) -> dict[int, LayerStats]:
    ts = _tensors(content.array_records.get("stats"))
    n = int(content.config_records["collab"]["n"])
    layers = sorted(int(k[3:]) for k in ts if k.startswith("rk."))
    return {l: LayerStats(ts[f"rk.{l}"].double(), ts[f"kk.{l}"].double(), n) for l in layers}


def _merge_deltas(mcfg: MergeConfig, deltas: list[dict[int, torch.Tensor]], counts: list[int]):
    from fedit.collab.merge import average, fedavg, task_arithmetic, ties

    if mcfg.method == "task-arithmetic":
        return task_arithmetic(deltas)
    if mcfg.method == "average":
        return average(deltas)
    if mcfg.method == "fedavg":
        return fedavg(deltas, [float(c) for c in counts])
    return ties(deltas, mcfg.ties_density, mcfg.ties_scale)


def _max_exponents(parts: list[dict[str, int]]) -> dict[str, int]:
    names = parts[0].keys()
    return {n: max(int(p.get(n, NO_EXPONENT)) for p in parts) for n in names}


def _secure_sum(grid, context, nodes, t, s: CollabServerSettings, base_cfg, exps, n_total):
    """Σ over clients of their statistics through Flower's SecAgg+ workflow (legacy stack)."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.common import FitIns, parameters_to_ndarrays
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import Strategy
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    class HandOver(Strategy):
        """Gives each client its FitIns and keeps the securely summed vector; nothing else."""

        result: tuple[list[np.ndarray], int] | None = None
        failures: list = []

        def initialize_parameters(self, client_manager):
            return None

        def configure_fit(self, server_round, parameters, client_manager):
            return [(p, FitIns(parameters, {**base_cfg(p.node_id), "exponents": json.dumps(exps)}))
                    for p in client_manager.all().values()]

        def aggregate_fit(self, server_round, results, failures):
            self.failures = list(failures)
            if results:
                self.result = (parameters_to_ndarrays(results[0][1].parameters), len(results))
            return None, {}

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    t0 = time.perf_counter()
    cm = SimpleClientManager()
    for nid in nodes:
        cm.register(GridClientProxy(node_id=nid, grid=grid, run_id=context.run_id))
    strategy = HandOver()
    ctx = LegacyContext(Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                                state=RecordDict(), run_config=context.run_config),
                        strategy=strategy, client_manager=cm)
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: t + 1})
    ctx.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = SecAggPlusWorkflow(num_shares=s.secagg_shares, reconstruction_threshold=s.secagg_threshold,
                                  max_weight=1.0, clipping_range=CLIP, quantization_range=LEVELS,
                                  modulus_range=MODULUS, timeout=s.timeout)
    workflow(grid, ctx)
    if strategy.result is None or strategy.failures:
        raise CollabError(f"SecAgg+ did not complete ({len(strategy.failures)} failure(s)).",
                          "see Flower's log; all clients must answer every stage.")
    means, m = strategy.result
    if m != len(nodes):
        raise CollabError(f"SecAgg+ summed {m} of {len(nodes)} clients.", "rerun; every client must take part.")
    sums = [a * m for a in means]  # the workflow returns the mean of the (integer) limbs
    err = max(float(np.abs(a - np.round(a)).max()) if a.size else 0.0 for a in sums)
    if err > 1e-3:
        raise CollabError(f"SecAgg+ returned sums {err:.3g} away from integers.", "check the SecAgg+ settings.")
    shapes = s.shapes
    total = decode([np.round(a) for a in sums], s.layers, shapes, exps, n_total)
    return total, {"clients": m, "arrays": len(sums), "values": int(sum(a.size for a in sums)),
                   "max_distance_from_integer": err, "seconds": round(time.perf_counter() - t0, 3)}


def run_flower_simulation(client: CollabClientSettings, server: CollabServerSettings,
                          num_cpus: int = 1) -> dict[str, Any]:
    """Run both apps in Flower's simulation engine (Ray, ``num_cpus`` actors); returns the report."""
    import os

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    from flwr.simulation import run_simulation

    sink: dict[str, Any] = {}
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": num_cpus}}
    run_simulation(server_app=collab_server_app(server, sink), client_app=collab_client_app(client),
                   num_supernodes=server.clients, backend_config=backend)
    if "error" in sink:
        raise sink["error"]
    if "report" not in sink:
        raise CollabError("the Flower run ended without a report.", "see Flower's log above.")
    return sink["report"]
