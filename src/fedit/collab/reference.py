"""The global reference of a CollabEdit run: MEMIT over all facts of rounds ≤ t at once, from
the base model, with the same target vectors z as the clients' edits.

In the base form (what CollabEdit must equal: every key and residual measured on the unedited
model) and layer by layer (MEMIT as published). For the layer-sequential form over several rounds
also the matching *sequential* reference (``sequential_layerwise``): centralised layer-by-layer
MEMIT run round after round with the same running covariance C₁ as the server keeps.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import torch

from fedit.progress import each  # the module's name is global_reference's callback argument
from fedit.collab.client import CollabClient, PublishedModel, pool
from fedit.collab.config import CollabConfig, for_form
from fedit.collab.merge import MergeConfig, MergeError, merge
from fedit.collab.protocol import Resolution, resolve
from fedit.methods.vectors import EditVectors

log = logging.getLogger(__name__)


def resolutions_for(clients: list[CollabClient], rounds: int, cfg: CollabConfig) -> list[Resolution]:
    """The server's decisions for every round (they depend on digests only, not on the merge)."""
    applied: dict[str, tuple[str, int]] = {}
    out = []
    for t in range(rounds):
        subs = {c.id: c.digests(t) for c in clients}
        res = resolve(subs, cfg.conflict_policy, cfg.priority, applied)
        for c in clients:
            for i in res.keep[c.id]:
                d = subs[c.id][i]
                applied.setdefault(d.key, (d.target, t + 1))
        out.append(res)
    return out


def global_reference(lm, plan: dict[str, list[list]], hparams, resources, cfg: CollabConfig,
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Global MEMIT over the facts the server keeps (same digests and policy as a run), per round.

    Returns {"report": {...}, "deltas": [cumulative Δ per round]}. Used to set a Flower run
    beside the edit it must equal; it optimises every target again, in this process.
    """
    say = progress or (lambda s: log.info(s))
    hp = for_form(hparams, cfg.form)
    published = PublishedModel(lm)
    clients = [CollabClient(c, published, hp, resources, recs, cfg.salt, cfg.residual_tol, cfg.dataset)
               for c, recs in plan.items()]
    try:
        for c in each(clients, "base-model measurement (reference): clients", unit="client", label=lambda c: c.id):
            c.pre_scores()
        C0 = resources.second_moments(lm, hp.layers, hp.mom2_samples, hp.mom2_seq_len)
        R = len(next(iter(plan.values())))
        return reference_rounds(lm, clients, resolutions_for(clients, R, cfg), hp, resources, C0, cfg, say)
    finally:
        published.reset()


def reference_rounds(lm, clients: list[CollabClient], resolutions: list[Resolution], hp, res, C0, cfg: CollabConfig,
                     say: Callable[[str], None]) -> dict[str, Any]:
    """Global MEMIT over all facts of rounds ≤ t at once, from the base model (both forms), per round t.

    Returns {"deltas": [base-form Δ per round], "layerwise_deltas": [layer-by-layer Δ per round],
    "sequential_deltas": [``sequential_layerwise``'s cumulative Δ per round: layer-sequential form,
    several rounds only], "report": {"rounds": [entry per round]}}; the model is at its base
    weights on return."""
    published = clients[0].model
    deltas, layerwise, entries = [], [], []
    try:
        for t in each(range(len(resolutions)), "global MEMIT reference", unit="round"):
            say(f"reference: global MEMIT over rounds 1..{t + 1}")
            delta, entry, reqs, zs = _base_form(lm, clients, resolutions, t, hp, C0)
            deltas.append(delta)
            if (cfg.layerwise_reference or cfg.form == "layerwise") and delta:
                lw_entry, lw_delta = _layerwise(lm, clients, t, hp, res, reqs, zs, delta)
                entry.update(lw_entry)
                layerwise.append(lw_delta)
            entries.append(entry)
        sequential = []
        if cfg.form == "layerwise" and len(resolutions) > 1:
            sequential = sequential_layerwise(lm, clients, resolutions, hp, res, C0, cfg, say)
            for entry, (_, scores) in zip(entries, sequential):
                entry["layerwise_sequential"] = scores
    finally:
        published.reset()
        for c in clients:
            c.kept.clear()
    return {"deltas": deltas, "layerwise_deltas": layerwise, "sequential_deltas": [d for d, _ in sequential],
            "report": {"rounds": entries}}


def sequential_layerwise(lm, clients: list[CollabClient], resolutions: list[Resolution], hp, res, C0, cfg: CollabConfig,
                         say: Callable[[str], None]) -> list[tuple[dict[int, torch.Tensor], dict[str, Any]]]:
    """Centralised layer-by-layer MEMIT, round after round, with a running covariance: what the
    layer-sequential form equals over several rounds. Per round t (the model carrying the
    cumulative Δ of rounds < t, z of the facts kept in round t optimised on that model):

        for each edited layer l, lowest first, on the model as edited so far in this round:
            Δ_l = R Kᵀ (λC₀ + C₁,l + K Kᵀ)⁻¹        (MEMIT's loop, ``memit.spread_over_layers``)
        then C₁,l += w · K Kᵀ, K the keys measured at l in that step (w = ``cfg.c1_weight``;
        no C₁ with ``cfg.c1`` off).

    Returns per round (cumulative Δ [d_out, d_in] per layer, scores of the facts applied so far)."""
    from fedit.core.solve import memit_delta
    from fedit.methods.memit import block_residual, spread_over_layers

    published = clients[0].model
    groups = res.templates(lm, hp.context_template_length_params)
    lw = dataclasses.replace(hp, form="layerwise")
    total: dict[int, torch.Tensor] = {}
    C1: dict[int, torch.Tensor] = {}
    out = []
    name = f"reference-sequential{'' if cfg.c1 else '-no-c1'}"
    published.reset()  # round 1 on the base model (its z are those of the base-form reference)
    for c in clients:
        c.kept.clear()
    for t, resolution in enumerate(resolutions):
        say(f"reference: layer-by-layer MEMIT, round {t + 1}, on the reference's rounds < {t + 1}")
        preps = {c.id: c.prepare(t, resolution.keep[c.id]) for c in clients}
        for c in clients:
            c.accept(t, preps[c.id])
        vecs = [(c, p) for c in clients for p in [preps[c.id]] if p.n]
        if vecs:
            reqs = [c.round_records(t)[i].request for c, p in vecs for i in p.used]
            zs = EditVectors.cat([p.vectors for _, p in vecs]).zs
            delta, diag = spread_over_layers(lm, reqs, lw, groups, block_residual(lm, zs, hp.layers[-1]),
                                             lambda l, K, R: memit_delta(K, R, C0[l], hp.mom2_update_weight, C1.get(l)))
            for l, K in diag["layer_vectors"]["keys"].items():
                if cfg.c1:
                    C1[l] = C1.get(l, 0) + cfg.c1_weight * (K.double().T @ K.double())
                total[l] = total.get(l, 0) + delta[l].double().cpu()
        published.set(f"{name}@{t + 1}", total)
        out.append(({l: d.clone() for l, d in total.items()}, _pooled(clients, t)))
    published.reset()
    return out


def _base_form(lm, clients, resolutions, t: int, hp, C0):
    """(Δ, report entry, requests, z) of the base-form solve over rounds ≤ t, measured and scored."""
    published = clients[0].model
    published.reset()
    t0 = time.perf_counter()
    preps = {c.id: [c.prepare(s, resolutions[s].keep[c.id]) for s in range(t + 1)] for c in clients}
    try:
        delta = merge(MergeConfig("collabedit"), [p.stats() for ps in preps.values() for p in ps], C0,
                      hp.mom2_update_weight)
    except MergeError:
        delta = {}
    entry: dict[str, Any] = {"round": t + 1, "edited": sum(p.n for ps in preps.values() for p in ps)}
    for c in clients:
        c.kept.clear()
        for s, p in enumerate(preps[c.id]):
            c.accept(s, p)
    vecs = [(c, s, p) for c in clients for s, p in enumerate(preps[c.id]) if p.n]
    reqs = [c.round_records(s)[i].request for c, s, p in vecs for i in p.used]
    zs = EditVectors.cat([p.vectors for _, _, p in vecs]).zs if vecs else None
    if zs is not None:
        entry["residual_before"] = _residual(lm, reqs, zs, hp.layers[-1])
    published.set(f"reference@{t + 1}", delta)
    entry["base"] = _pooled(clients, t)
    if zs is not None:
        entry["base_residual_after"] = _residual(lm, reqs, zs, hp.layers[-1])
    entry["seconds_base"] = round(time.perf_counter() - t0, 3)
    published.reset()
    return delta, entry, reqs, zs


def _layerwise(lm, clients, t: int, hp, res, reqs, zs, delta) -> tuple[dict[str, Any], dict[int, torch.Tensor]]:
    """MEMIT as published over the same facts with the same z: (report entry with its scores and its
    distance to the base form, its Δ per layer [d_out, d_in])."""
    from fedit.methods.memit import compute_memit

    t1 = time.perf_counter()
    out = compute_memit(lm, reqs, dataclasses.replace(hp, form="layerwise"), res, zs=zs)
    base_wd = clients[0].model.weight_deltas(delta).deltas
    names = {l: lm.adapter.w_out_param_name(l) for l in sorted(delta)}
    diff = {l: out.deltas.deltas[n].double() - base_wd[n].double() for l, n in names.items()}
    entry: dict[str, Any] = {"layerwise_vs_base": {  # how far MEMIT as published is from its base form, same z
        "relative": max(float(d.abs().max()) for d in diff.values())
        / max(float(base_wd[n].double().abs().max()) for n in names.values()),
        "per_layer_fro": {str(l): float(diff[l].norm() / base_wd[n].double().norm()) for l, n in names.items()}}}
    with out.deltas.applied(lm.model):
        entry["layerwise"] = _pooled(clients, t)
    entry["seconds_layerwise"] = round(time.perf_counter() - t1, 3)
    entry["layerwise_residual_norms"] = out.diagnostics.get("residual_norms")
    # to_param_layout is a transpose or the identity: applied again it gives the math layout back
    return entry, {l: lm.adapter.to_param_layout(out.deltas.deltas[n].double()) for l, n in names.items()}


def _residual(lm, requests, zs: torch.Tensor, L: int) -> float:
    """Mean ‖z − h_L‖ at the subject's last token on the model as it is."""
    from fedit.core import activations

    cur = activations.at_subject(lm, requests, ["{}"], {"h": f"{lm.adapter.block_name(L)}:output"})
    return float((zs.to(lm.device).float() - cur["h"][:, 0].float()).norm(dim=1).mean())


def _pooled(clients, upto: int) -> dict[str, float]:
    parts = [p["post"] for c in clients for p in c.evaluate(upto).values()]
    return pool(parts) if parts else {}
