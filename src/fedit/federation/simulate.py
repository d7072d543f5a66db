"""``fedit fed run``: a one-machine FedEdit federation on Flower's simulation engine
(``federation.app.simulation``), then the centralised reference and the report."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from fedit.federation.fededit import FedError
from fedit.federation.settings import FedSettings, client_records

log = logging.getLogger(__name__)


def stored_targets(settings: FedSettings) -> dict[str, Any]:
    """z of every fact in the MKV store by fact id (private mode: all measured on the base model)."""
    from fedit.federation.store import MKVStore

    from fedit.methods import get_method

    zs = {}
    if settings.mode != "private" or not settings.store_path.exists() or not get_method(settings.method).takes_targets:
        return zs  # (GRACE's store holds codebook entries, not targets)
    with MKVStore(settings.store_path) as store:
        for slot in range(settings.slots):
            for m in store.for_slot(slot):
                zs[str(m.meta.get("fact"))] = m.payload.get("z", m.vector)
    return zs


def run(settings: FedSettings, reference: bool = True) -> dict[str, Any]:
    """The federation, the centralised reference and the report files; returns the report."""
    from fedit.federation.app.simulation import run_federation

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
