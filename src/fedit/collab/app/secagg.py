"""The secure sum of the clients' statistics through Flower's SecAgg+ (server side).

SecAgg+ in flwr 1.41 exists only in the legacy stack: the client mod is
``flwr.client.mod.secaggplus_mod`` (it wraps ``train`` messages and expects the legacy
FitIns/FitRes layout inside them) and the server side is ``flwr.server.workflow.SecAggPlusWorkflow``,
which needs a ``LegacyContext`` with a Strategy and a ClientManager. We drive that workflow from
our Message-API ServerApp for the one step that needs it, with a small Strategy that hands over
the summed vector. Its quantiser is made exact by ``fedit.collab.secure``.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

from fedit.collab.client import CollabError
from fedit.collab.secure import CLIP, LEVELS, MODULUS, decode
from fedit.methods.vectors import LayerSums


class HandOver(Strategy):
    """Gives each client its FitIns and keeps the securely summed vector; nothing else."""

    def __init__(self, fit_config: Callable[[int], dict[str, Any]]):
        self.fit_config = fit_config
        self.result: tuple[list[np.ndarray], int] | None = None
        self.failures: list = []
        self.summed: list[int] = []  # node ids whose vectors are in the sum

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(p, FitIns(parameters, self.fit_config(p.node_id))) for p in client_manager.all().values()]

    def aggregate_fit(self, server_round, results, failures):
        self.failures = list(failures)
        self.summed = sorted(int(p.node_id) for p, _ in results)
        if results:
            self.result = (parameters_to_ndarrays(results[0][1].parameters), len(results))
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def _run_workflow(grid, context: Context, nodes: list[int], rnd: int, strategy: HandOver, shares: float,
                  threshold: float) -> None:
    cm = SimpleClientManager()
    for nid in nodes:
        cm.register(GridClientProxy(node_id=nid, grid=grid, run_id=context.run_id))
    ctx = LegacyContext(Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                                state=RecordDict(), run_config=context.run_config),
                        strategy=strategy, client_manager=cm)
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: rnd + 1})
    ctx.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = SecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=threshold, max_weight=1.0,
                                  clipping_range=CLIP, quantization_range=LEVELS, modulus_range=MODULUS)
    workflow(grid, ctx)


def secure_sum(grid, context: Context, nodes: list[int], rnd: int, fit_config: Callable[[int], dict[str, Any]],
               layout: tuple[list[int], dict[int, tuple[int, int]]], exps: dict[str, int], counts: dict[int, int],
               shares: float = 1.0, threshold: float = 0.67) -> tuple[dict[int, LayerSums], dict[str, Any]]:
    """Σ over clients of their statistics, the server seeing only the masked sum.

    ``fit_config(node)``: what that client needs to find its prepared edit; ``layout``: (layers,
    (d_out, d_in) per layer); ``exps``: the agreed exponent per tensor; ``counts``: facts per node.
    A node that drops out after SecAgg+'s setup (before or while sending its masked vector) is
    left out: Flower's SecAgg+ removes its pairwise masks from the others' shares, and the sum is
    over the rest, as long as the reconstruction threshold is met. Returns (summed statistics,
    a log entry with ``summed`` and ``dropped`` node ids)."""
    t0 = time.perf_counter()
    strategy = HandOver(lambda nid: {**fit_config(nid), "exponents": json.dumps(exps)})
    _run_workflow(grid, context, nodes, rnd, strategy, shares, threshold)
    if strategy.result is None:
        raise CollabError(f"SecAgg+ did not complete ({len(strategy.failures)} failure(s)): too few clients "
                          f"answered to reconstruct the sum.", "see Flower's log; rerun with the clients online.")
    means, m = strategy.result
    if m != len(strategy.summed) or not set(strategy.summed) <= set(nodes):
        raise CollabError(f"SecAgg+ summed {m} vectors from nodes {strategy.summed}.", "check the SecAgg+ settings.")
    sums = [a * m for a in means]  # the workflow returns the mean of the (integer) limbs
    err = max(float(np.abs(a - np.round(a)).max()) if a.size else 0.0 for a in sums)
    if err > 1e-3:
        raise CollabError(f"SecAgg+ returned sums {err:.3g} away from integers.", "check the SecAgg+ settings.")
    layers, shapes = layout
    total = decode([np.round(a) for a in sums], layers, shapes, exps, sum(counts[n] for n in strategy.summed))
    dropped = sorted(set(nodes) - set(strategy.summed))
    return total, {"clients": m, "summed": strategy.summed, "dropped": dropped, "arrays": len(sums),
                   "values": int(sum(a.size for a in sums)), "max_distance_from_integer": err,
                   "seconds": round(time.perf_counter() - t0, 3)}
