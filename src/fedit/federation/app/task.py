"""FedEdit's work on one node, free of Flower: the model a process holds, a client session that
always leaves the model at its base weights, and the steps the ClientApp's messages ask for.

The ClientApp (``client_app``) only turns messages into calls here and results into messages.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any, Iterator

import torch

from fedit.deltas import WeightDeltas
from fedit.federation.codebook import client_class
from fedit.federation.fededit import FedEditClient, fedavg_update
from fedit.federation.privacy import check_consent
from fedit.federation.settings import FedSettings, client_records

_MODELS: dict[tuple, Any] = {}  # loaded models and their Resources, per process


def settings_for(run_config: dict[str, Any], given: FedSettings | None) -> FedSettings:
    """The run's settings: those the app was made with, else the run config (deployment)."""
    return given if given is not None else FedSettings.from_user_config(dict(run_config))


def model_for(s: FedSettings):
    """The process's copy of the run's model (loaded once per process)."""
    from fedit.models.loading import load_model

    key = (s.model, s.device, s.dtype, s.cache_dir)
    if key not in _MODELS:
        if s.threads:
            torch.set_num_threads(s.threads)
        _MODELS[key] = load_model(s.model, device=s.device or None, dtype=s.dtype or None,
                                  cache_dir=s.cache_dir or None)
    return _MODELS[key]


def resources_for(s: FedSettings):
    from fedit.methods import Resources

    key = ("resources", s.cache_dir, s.corpus)
    if key not in _MODELS:
        _MODELS[key] = Resources(cache_dir=s.cache_dir or None, corpus=s.corpus or None)
    return _MODELS[key]


def client_id(node_config: dict[str, Any]) -> str:
    """The node's client id: ``client-id`` from its node config, else ``client-<partition-id>``."""
    return str(node_config.get("client-id", f"client-{int(node_config.get('partition-id', 0))}"))


@contextmanager
def client_session(s: FedSettings, node_config: dict[str, Any], saved: dict[str, Any] | None,
                   lm=None) -> Iterator[tuple[FedEditClient, list]]:
    """The node's client with its saved edits on the model, and its records.

    However the block ends, the model is back at its base weights (the process's model is
    shared by every node it serves). ``saved``: what ``FedEditClient.state()`` returned last.
    Plaintext requests are sent only with the node's own consent (``privacy.check_consent``: a
    paper-mode run without it is refused here, before the model is loaded).
    """
    from fedit.methods import hparams_for

    pid = int(node_config.get("partition-id", 0))
    npart = int(node_config.get("num-partitions", s.clients))
    cid = client_id(node_config)
    share = check_consent(s.mode, node_config, cid)  # the node's own consent, never the run config's
    lm = lm if lm is not None else model_for(s)
    hp = hparams_for(s.method, lm, s.hparam_overrides(), s.hparams_file or None)
    cls = client_class(s.method)  # FedEditClient, or GRACE's CodebookClient (bounds of its own)
    client = cls(cid, lm, hp, resources_for(s), mode=s.mode, share_requests=share, match=s.match, method=s.method,
                 **({"norm_factor": s.norm_factor} if cls is FedEditClient else {}))
    try:
        if saved is not None:
            client.load_state(saved)
        yield client, client_records(s, pid, npart, str(node_config.get("data-path", "")))
    finally:
        client.to_base()


def slot_requests(s: FedSettings, records: list, slot: int) -> list:
    from fedit.federation.partition import split_slots

    return split_slots(records, s.slots)[slot]


def global_edit(lm, deltas: dict[str, torch.Tensor]):
    """A context in which the FedAvg global update (parameter name → Δ) is on the model."""
    if not deltas:
        return nullcontext()
    return WeightDeltas(deltas=deltas, method="fedavg", model=lm.identity()).applied(lm.model)


def fedavg_step(client: FedEditClient, glob: dict[str, torch.Tensor], records: list,
                method: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The client's FedAvg update on the global model (base + ``glob``); the model is left as it was."""
    client.to_base()
    with global_edit(client.lm, glob):
        t0 = time.perf_counter()
        upd, t_target = fedavg_update(client.lm, client.hp, client.res, [r.request for r in records], method=method)
    return upd, {"n": len(records), "seconds": time.perf_counter() - t0, "target_seconds": t_target}


def evaluate_step(client: FedEditClient, records: list, dataset: str, glob: dict[str, torch.Tensor] | None = None,
                  facts: list[str] | None = None) -> dict[str, Any]:
    """Metrics before and after: the client's own edits, or the FedAvg global update. The aggregates
    always; per record only when ``facts`` (one token per record) is given, i.e. the node opted in.

    The client's edits are on the model on entry; on return the model is at its base weights."""
    from fedit.evaluate.runner import aggregate, measure, record_metrics

    lm = client.lm
    held = [a.deltas for a in client.applied]
    client.to_base()
    raw_pre = measure(lm, records)
    with ExitStack() as stack:
        if glob:
            stack.enter_context(global_edit(lm, glob))
        else:
            for d in held:
                stack.enter_context(d.applied(lm.model))
        raw_post = measure(lm, records)
    kind = "zsre" if dataset == "zsre" else "counterfact"
    pre = [record_metrics(r, None, kind) for r in raw_pre]
    post = [record_metrics(r, p, kind) for r, p in zip(raw_post, raw_pre)]
    out = {"client": client.id, "pre": aggregate(pre), "post": aggregate(post), "report": client.report.to_dict()}
    if facts is not None:
        out["per_record"] = [{"fact": f, "pre": a, "post": b} for f, a, b in zip(facts, pre, post)]
    return out
