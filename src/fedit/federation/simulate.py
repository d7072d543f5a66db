"""``fedit fed run``: a one-machine FedEdit federation on Flower's simulation engine
(``federation.app.simulation``), then the centralised reference and the report."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from fedit import progress
from fedit.federation.fededit import FedError
from fedit.federation.settings import FedSettings, client_records

log = logging.getLogger(__name__)


def stored_targets(settings: FedSettings, lm, names: dict[str, str]) -> dict[str, Any]:
    """z of the facts in the MKV store (private mode: all measured on the base model), by the ids in
    ``names`` (fact token -> id). Every record passes the guard of ``lm`` first; a refused one is
    logged and left out (the reference then optimises that fact's z itself)."""
    from fedit.errors import StoreError
    from fedit.federation.guard import Guard, measure_scale
    from fedit.federation.store import MKVStore
    from fedit.methods import get_method, hparams_for

    zs: dict[str, Any] = {}
    if (settings.mode != "private" or not names or not settings.store_path.exists()
            or not get_method(settings.method).takes_targets):
        return zs  # (GRACE's store holds codebook entries, not targets)
    hp = hparams_for(settings.method, lm, settings.hparam_overrides(), settings.hparams_file or None)
    guard = Guard(measure_scale(lm, list(hp.layers)), settings.norm_factor)
    with MKVStore(settings.store_path, check=guard.for_store(settings.mode, settings.match)) as store:
        for i in store.ids():
            try:
                (m,) = store.get([i])
            except StoreError as e:
                log.warning("the centralised reference does not reuse a stored z: %s", e.problem)
                continue
            if str(m.meta.get("fact")) in names:
                zs[names[str(m.meta.get("fact"))]] = m.payload.get("z", m.vector)
    return zs


def run(settings: FedSettings, reference: bool = True) -> dict[str, Any]:
    """The federation, the centralised reference and the report files; returns the report.

    The simulated nodes get one node config: consent to share requests as ``settings`` says
    (one user plays every organisation here) and this run's random fact-token key, which lets
    the reference find the stored z of each record."""
    from fedit.federation.app.simulation import run_federation
    from fedit.federation.privacy import FACT_KEY, SHARE_REQUESTS, new_fact_key

    t0 = time.perf_counter()
    key = new_fact_key()
    fed = run_federation(settings, node_config={SHARE_REQUESTS: settings.share_requests, FACT_KEY: key})
    return report_for(fed, settings, reference, t0, fact_key=key)


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


def _reference(fed: dict[str, Any], settings: FedSettings, fact_key: str | None) -> dict[str, Any] | None:
    """The centralised MEMIT reference over every client's records (None where clients are not
    client-0..N-1), reusing the stored z of the records whose tokens ``fact_key`` (the nodes' key)
    gives back; with a progress task: loading the model, then the edit and its measurement."""
    from fedit.federation import report as R
    from fedit.federation.privacy import fact_token
    from fedit.models.loading import load_model

    records = {f"client-{i}": client_records(settings, i, settings.clients) for i in range(settings.clients)}
    if set(records) != set(fed["clients"]):
        log.warning("clients %s are not client-0..N-1: no centralised reference", fed["clients"])
        return None
    with progress.task("centralised MEMIT reference", total=2, unit="step") as bar:
        bar.show({"stage": "loading the model"})
        lm = load_model(settings.model, device=settings.device or None, dtype=settings.dtype or None,
                        cache_dir=settings.cache_dir or None)
        bar.update(1, stage="edit all facts, measure")
        names = {fact_token(fact_key, c, r.case_id): f"{c}/{r.case_id}" for c, recs in records.items()
                 for r in recs} if fact_key else {}
        ref = R.centralised_reference(lm, records, settings, zs=stored_targets(settings, lm, names))
        bar.update(1)
    return ref


def report_for(fed: dict[str, Any], settings: FedSettings, reference: bool, t0: float,
               fact_key: str | None = None) -> dict[str, Any]:
    """The report of ``fed``; with ``reference`` the centralised edit (``_reference``)."""
    from fedit.federation import report as R

    ref = None
    if reference and settings.evaluate:
        ref = _reference(fed, settings, fact_key)
    report = R.build(fed, ref, time.perf_counter() - t0)
    report["files"] = R.write(report, settings.out)
    return report
