"""CollabEdit's round loop, written once for every engine.

Per round and merge method the server

1. collects the salted digests of the round's facts and resolves overlaps and conflicts
   (``protocol.resolve``, against the facts applied in earlier rounds);
2. lets every client edit the facts it may keep, on the model it has published so far;
3. merges: CollabEdit sums the clients' statistics R Kᵀ and K Kᵀ and solves once with
   λC₀ + C₁ + Σ K Kᵀ; a baseline merges the clients' own updates Δᵢ (``merge.merge_updates``);
4. publishes the merged update (``CollabState``: cumulative Δ, C₁, the facts applied);
5. has every client measure its applied facts on the merged model.

An ``Exchange`` carries the server's questions to the clients and their answers back: in this
process (``driver.LocalExchange``) or as Flower messages (``collab.app.exchange``). Nothing
here knows which.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from fedit import progress
from fedit.collab.config import CollabConfig
from fedit.collab.merge import MergeError, merge_updates, solve
from fedit.collab.protocol import FactDigest, Resolution, resolve
from fedit.collab.report import round_entry
from fedit.collab.state import CollabState
from fedit.methods.vectors import LayerSums, delta_from_sums

Delta = dict[int, torch.Tensor]  # layer -> [d_out, d_in], math layout of W_out
Applied = dict[str, dict[int, list[int]]]  # client -> round -> indices of the facts now on the model
STAGES = 4  # of a round, for progress: digests, clients edit, merge, evaluate


class ClientsLost(Exception):
    """Raised by an ``Exchange`` when clients stopped answering before the round's merge (their
    node is gone); the exchange no longer asks them and ``run_round`` redoes the round without
    them, so the merge is exactly that of the clients present. The exchange records who and where."""


@dataclass
class Edited:
    """What a client says after editing a round's kept facts (nothing about the facts themselves)."""

    used: list[int]  # indices into the round's facts that entered its statistics
    vanished: list  # case ids kept by the server but already said by the model
    seconds: float = 0.0


class Exchange(Protocol):
    """The server's questions to every client; answers are keyed by client id, in client order."""

    def digests(self, rnd: int) -> dict[str, list[FactDigest]]:
        """Salted digests of each client's facts of round ``rnd``."""

    def prepare(self, rnd: int, keep: dict[str, list[int]], state: CollabState) -> dict[str, Edited]:
        """Each client edits its kept facts on the model that carries ``state``."""

    def summed_stats(self, rnd: int, keep: dict[str, list[int]], state: CollabState) -> dict[int, LayerSums]:
        """Σ over clients of the prepared statistics (the server may see only the sum)."""

    def updates(self, rnd: int, keep: dict[str, list[int]], state: CollabState) -> tuple[list[Delta], list[float]]:
        """Each client's own update Δᵢ and its number of edits."""

    def layer_stats(self, rnd: int, keep: dict[str, list[int]], state: CollabState, step: int,
                    below: Delta) -> LayerSums:
        """Layer-sequential form: Σ over clients of the statistics at edited layer ``step``, measured
        on the model carrying ``state`` plus ``below`` (this round's merged lower layers)."""

    def evaluate(self, rnd: int, state: CollabState, applied: Applied) -> dict[str, dict[int, dict]]:
        """Each client's metrics (``client.summed``) per round of origin, on the model carrying ``state``."""


@dataclass
class Solver:
    """The server's public part of the solve: C₀ per layer, λ, the edited layers (ascending)."""

    C0: dict[int, torch.Tensor]
    lam: float
    layers: list[int]


def _merged(method: str, ex: Exchange, rnd: int, keep: dict[str, list[int]], st: CollabState,
            cfg: CollabConfig, solver: Solver) -> tuple[dict[int, LayerSums], Delta]:
    """(summed statistics or {}, merged Δ or {} when nothing can be merged)."""
    if method == "collabedit" and cfg.form == "layerwise":
        return _layer_by_layer(ex, rnd, keep, st, cfg, solver)
    if method == "collabedit":
        total = ex.summed_stats(rnd, keep, st)
        return total, solve(total, solver.C0, solver.lam, st.C1 if cfg.c1 else None)
    deltas, counts = ex.updates(rnd, keep, st)
    try:
        return {}, merge_updates(cfg.merge_config(method), deltas, counts)
    except MergeError:  # e.g. no client with an update
        return {}, {}


def _layer_by_layer(ex: Exchange, rnd: int, keep: dict[str, list[int]], st: CollabState, cfg: CollabConfig,
                    solver: Solver) -> tuple[dict[int, LayerSums], Delta]:
    """One exchange per edited layer, lowest first: the clients measure with the merged layers
    below applied, the server solves the layer with λC₀ + C₁ + Σ K Kᵀ."""
    total: dict[int, LayerSums] = {}
    delta: Delta = {}
    for step, l in progress.each(list(enumerate(solver.layers)), "layerwise merge", unit="layer", label=lambda x: x[1]):
        s_l = ex.layer_stats(rnd, keep, st, step, delta)
        total[l] = s_l
        C1 = st.C1.get(l) if cfg.c1 else None
        delta[l] = delta_from_sums(s_l, solver.C0[l].to(s_l.KK.device), solver.lam, C1)
    return total, delta


def _kept_facts(subs: dict[str, list[FactDigest]], res: Resolution, left_out: set[str]) -> dict[str, str]:
    return {subs[c][i].key: subs[c][i].target for c in subs if c not in left_out for i in res.keep[c]}


def run_round(rnd: int, method: str, ex: Exchange, st: CollabState, applied: Applied, cfg: CollabConfig,
              solver: Solver, stages: progress.Task = progress.Task(None)) -> tuple[dict[str, Any], Resolution]:
    """One round of one merge method; updates ``st`` and ``applied``; returns (report entry, resolution).
    ``stages`` moves by one per stage (digests, clients edit, merge, evaluate: ``STAGES``)."""
    t0 = time.perf_counter()
    while True:  # once more for each loss of clients before the merge
        try:
            stages.show({"stage": "digests"})
            subs = ex.digests(rnd)
            res = resolve(subs, cfg.conflict_policy, cfg.priority, st.applied)
            stages.update(1, stage="clients edit")
            edited = ex.prepare(rnd, res.keep, st)
            n_total = sum(len(e.used) for e in edited.values())
            stages.update(1, stage=f"merge ({cfg.form})" if method == "collabedit" else "merge")
            t1 = time.perf_counter()
            total, delta = _merged(method, ex, rnd, res.keep, st, cfg, solver) if n_total else ({}, {})
            break
        except ClientsLost:
            stages.show({"stage": "redo without the lost clients"})
            continue
    t_merge = time.perf_counter() - t1
    stages.update(1, stage="evaluate")
    c1 = cfg.c1 and method == "collabedit"
    out = set(ex.dropped(rnd)) if method == "collabedit" and hasattr(ex, "dropped") else set()  # SecAgg+ dropouts
    st.apply(delta, total or None, _kept_facts(subs, res, out), c1=c1, c1_weight=cfg.c1_weight,
             version=f"{method}@{rnd + 1}")
    for c in subs:
        applied.setdefault(c, {})[rnd] = list(edited[c].used) if delta and c not in out else []
    t2 = time.perf_counter()
    evals = ex.evaluate(rnd, st, applied)
    stages.update(1)
    counts = {c: {"submitted": len(subs[c]), "kept": len(res.keep[c]), "used": 0 if c in out else len(edited[c].used),
                  "vanished": list(edited[c].vanished), "seconds": round(edited[c].seconds, 3),
                  **({"dropped": True} if c in out else {})} for c in subs}
    seconds = {"vectors": sum(e.seconds for e in edited.values()), "merge": t_merge,
               "eval": time.perf_counter() - t2, "round": time.perf_counter() - t0}
    extra = {"delta_norm": {str(l): float(d.norm()) for l, d in st.delta.items()}}
    return round_entry(rnd, counts, evals, seconds, extra), res


def run_merges(ex: Exchange, rounds: int, cfg: CollabConfig, solver: Solver,
               say: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Every merge method of ``cfg`` for ``rounds`` rounds, each from the base model.

    Returns {"runs": {method: {"method", "rounds", "final"}}, "resolutions": [Resolution per
    round], "deltas": {method: [cumulative Δ after each round]}}."""
    runs, deltas, resolutions = {}, {}, []
    with progress.task("CollabEdit rounds", total=len(cfg.merges) * rounds, unit="round") as bar:
        for method in cfg.merges:
            st, applied, entries, deltas[method] = CollabState(), {}, [], []
            for t in range(rounds):
                say(f"{method}: round {t + 1}/{rounds}")
                bar.show({"merge": method, "round": f"{t + 1}/{rounds}"})
                with progress.task(f"{method} round {t + 1}/{rounds}", total=STAGES, unit="stage") as stages:
                    entry, res = run_round(t, method, ex, st, applied, cfg, solver, stages)
                if len(resolutions) < rounds:
                    resolutions.append(res)
                efficacy = entry["metrics"].get("efficacy_success", float("nan"))
                say(f"{method}: round {t + 1}: edited {entry['edited']} facts; efficacy {efficacy:.3f} over all applied")
                bar.update(1, merge=method, round=f"{t + 1}/{rounds}", edited=entry["edited"], efficacy=efficacy)
                entries.append(entry)
                deltas[method].append({l: d.clone() for l, d in st.delta.items()})
            runs[method] = {"method": method, "rounds": entries, "final": entries[-1]["metrics"] if entries else {}}
    return {"runs": runs, "resolutions": resolutions, "deltas": deltas}
