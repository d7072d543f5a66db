"""``fedit fed run``: a one-machine FedEdit federation on Flower's simulation engine, then the
centralised reference and the report."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from fedit.extras import require
from fedit.federation.fededit import FedError
from fedit.federation.settings import FedSettings, client_records

log = logging.getLogger(__name__)


def backend_config(settings: FedSettings) -> dict[str, Any]:
    """One Ray actor: the model is loaded once per process and clients take turns on it."""
    gpus = 1.0 if settings.device.startswith("cuda") else 0.0
    return {"init_args": {"num_cpus": 1, "num_gpus": gpus, "logging_level": "ERROR", "log_to_driver": True},
            "client_resources": {"num_cpus": 1, "num_gpus": gpus}}


def run_federation(settings: FedSettings) -> dict[str, Any]:
    """Run the Flower simulation; return what the ServerApp wrote (federation.json)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    require("flwr.simulation", "fed")  # Flower's simulation engine (with Ray): the [fed] extra
    from flwr.simulation import run_simulation

    from fedit.federation.flower_apps import make_client_app, make_server_app

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("federation.json", "federation.error.json"):
        (out / name).unlink(missing_ok=True)
    if settings.store_path.exists():
        raise FedError(f"the MKV store {settings.store_path} already exists (from an earlier run).",
                       "pass a new --out folder, or --store with a new file, or delete the old store.")
    for i in range(settings.clients):  # refuse bad data before the engine starts
        client_records(settings, i, settings.clients)
    err = out / "federation.error.json"
    try:
        run_simulation(server_app=make_server_app(settings), client_app=make_client_app(settings),
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


def stored_targets(settings: FedSettings) -> dict[str, Any]:
    """z of every fact in the MKV store by fact id (private mode: all measured on the base model)."""
    from fedit.federation.store import MKVStore

    zs = {}
    if settings.mode != "private" or not settings.store_path.exists():
        return zs
    with MKVStore(settings.store_path) as store:
        for slot in range(settings.slots):
            for m in store.for_slot(slot):
                zs[str(m.meta.get("fact"))] = m.payload.get("z", m.vector)
    return zs


def run(settings: FedSettings, reference: bool = True) -> dict[str, Any]:
    """The federation, the centralised reference and the report files; returns the report."""
    t0 = time.perf_counter()
    fed = run_federation(settings)
    return report_for(fed, settings, reference, t0)


def report_from_dir(out: str | Path, reference: bool = True) -> dict[str, Any]:
    """The report of a finished run (simulation or deployment) from its ``federation.json``."""
    path = Path(out) / "federation.json"
    if not path.exists():
        err = Path(out) / "federation.error.json"
        raise FedError(f"{path} does not exist" + (f"; the run failed: {json.loads(err.read_text())['error']}"
                                                  if err.exists() else "."),
                       "point --out to the folder a finished run wrote (the ServerApp's out setting).")
    try:
        fed = json.loads(path.read_text())
        settings = FedSettings.from_user_config(fed["settings"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise FedError(f"{path} is not a federation result ({e}).", "use the file a fedit run wrote.") from e
    return report_for(fed, settings.replace(out=str(out)), reference, time.perf_counter() - float(fed.get("seconds", 0)))


def report_for(fed: dict[str, Any], settings: FedSettings, reference: bool, t0: float) -> dict[str, Any]:
    from fedit.federation import report as R

    ref = None
    if reference and settings.evaluate:
        from fedit.models.loading import load_model

        lm = load_model(settings.model, device=settings.device or None, dtype=settings.dtype or None,
                        cache_dir=settings.cache_dir or None)
        records = {f"client-{i}": client_records(settings, i, settings.clients) for i in range(settings.clients)}
        if set(records) != set(fed["clients"]):
            log.warning("clients %s are not client-0..N-1: no centralised reference", fed["clients"])
        else:
            ref = R.centralised_reference(lm, records, settings, zs=stored_targets(settings))
    report = R.build(fed, ref, time.perf_counter() - t0)
    report["files"] = R.write(report, settings.out)
    return report
