"""``fedit collab run --engine flower``: both apps in Flower's simulation engine, then the report
with the global reference computed in this process."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from fedit.collab.client import CollabError
from fedit.collab.config import CollabConfig
from fedit.collab.settings import CollabSettings


def run_simulation(s: CollabSettings, lm=None, res=None, num_cpus: int = 1,
                   node_configs: dict[int, dict] | None = None) -> tuple[dict[str, Any], dict]:
    """Run both apps in Flower's simulation engine (Ray, ``num_cpus`` actors); returns (report, Δs).

    ``node_configs``: partition-id → what that node's own config holds (its facts as ``records``,
    a ``salt``, a ``drop-at``), as each SuperNode's ``--node-config`` would in a deployment."""
    from fedit.extras import require

    require("flwr.simulation", "collab")  # Flower's simulation engine (with Ray)
    from fedit.federation.flower import configure_environment

    configure_environment()
    from flwr.simulation import run_simulation as flower_run

    from fedit.collab.app.client_app import make_client_app
    from fedit.collab.app.server_app import make_server_app

    from fedit.collab.app import task

    sink: dict[str, Any] = {}
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": num_cpus}}
    try:
        flower_run(server_app=make_server_app(s, lm, res, sink), client_app=make_client_app(s, node_configs),
                   num_supernodes=s.clients, backend_config=backend)
    finally:
        task.release()  # what this process held for the run (the server's view of the model)
    if "error" in sink:
        raise sink["error"]
    if "report" not in sink:
        raise CollabError("the Flower run ended without a report.", "see Flower's log above.")
    return sink["report"], sink["deltas"]


def run_flower(s: CollabSettings, cfg: CollabConfig, lm, plan: dict[str, list[list]], hp, res,
               say: Callable[[str], None] = lambda m: None, node_configs: dict[int, dict] | None = None) -> dict[str, Any]:
    """The Flower run of ``s`` and, with ``cfg.reference``, the global reference beside it.

    ``plan``: the run's facts per client; node i (client ``c<i>``) is handed only its own share,
    in its node config, besides what ``node_configs`` adds. The clients agree their digest salt
    among themselves; ``cfg.salt`` serves the reference only."""
    from fedit.collab.reference import global_reference
    from fedit.collab.report import annotate, attach_reference

    say(f"Flower simulation: {s.clients} client nodes{' with SecAgg+' if s.secagg else ''}")
    own = {i: {"records": plan[c], **(node_configs or {}).get(i, {})} for i, c in enumerate(plan)}
    report, deltas = run_simulation(s, lm, res, node_configs=own)
    report["resolution"] = [annotate(r, plan, t) for t, r in enumerate(report["resolution"])]
    report.update(config=cfg.to_dict(), hparams=dataclasses.asdict(hp), reference=None)
    if cfg.reference:
        say("global MEMIT reference, in this process")
        attach_reference(report, global_reference(lm, plan, hp, res, cfg, say), deltas, cfg.form)
    return report
