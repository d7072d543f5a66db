"""FedEdit on Flower's simulation engine: both apps on one machine, for ``fedit fed run``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedit.federation.fededit import FedError
from fedit.federation.settings import FedSettings, client_records


def backend_config(settings: FedSettings) -> dict[str, Any]:
    """One Ray actor: the model is loaded once per process and clients take turns on it."""
    gpus = 1.0 if settings.device.startswith("cuda") else 0.0
    return {"init_args": {"num_cpus": 1, "num_gpus": gpus, "logging_level": "ERROR", "log_to_driver": True},
            "client_resources": {"num_cpus": 1, "num_gpus": gpus}}


def run_federation(settings: FedSettings, node_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the Flower simulation; return what the ServerApp wrote (federation.json). ``node_config``
    is every simulated node's own config (consent keys, ``federation.privacy``)."""
    from fedit.extras import require

    require("flwr.simulation", "fed")  # Flower's simulation engine (with Ray)
    from fedit.federation.flower import configure_environment

    configure_environment()
    from flwr.simulation import run_simulation

    from fedit.federation.app.client_app import make_client_app
    from fedit.federation.app.server_app import make_server_app

    out = Path(settings.out)
    if settings.store_path.exists():  # refuse before touching anything an earlier run left
        raise FedError(f"the MKV store {settings.store_path} already exists (from an earlier run).",
                       "pass a new --out folder, or --store with a new file, or delete the old store.")
    for i in range(settings.clients):  # refuse bad data before the engine starts
        client_records(settings, i, settings.clients)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("federation.json", "federation.error.json"):
        (out / name).unlink(missing_ok=True)
    err = out / "federation.error.json"
    try:
        run_simulation(server_app=make_server_app(settings), client_app=make_client_app(settings, node_config),
                       num_supernodes=settings.clients, backend_config=backend_config(settings))
    except Exception as e:  # the engine re-raises the ServerApp's failure
        if not err.exists():
            raise FedError(f"the Flower simulation failed: {type(e).__name__}: {e}",
                           "run again with -v to see Flower's log.") from e
    if err.exists():
        raise FedError(f"the federated run failed: {json.loads(err.read_text())['error']}",
                       "see the log above; fix the cause and run again with a new --out.")
    res = out / "federation.json"
    if not res.exists():
        raise FedError("the Flower run ended without a result.", "run again with -v to see Flower's log.")
    return json.loads(res.read_text())
