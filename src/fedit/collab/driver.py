"""A plain in-process CollabEdit run: the server and every client in one process, on one model.

All clients see the same published model, so one copy serves them all (``PublishedModel``). The
round loop is ``collab.rounds`` (the Flower server runs the same one); here its questions are
plain calls (``LocalExchange``). Several merge methods run on the same facts, and the clients'
edit vectors are cached per published model, so methods share the first round's vectors. With
``cfg.reference`` the run also edits all facts of rounds ≤ t at once from the base model
(``collab.reference``): what CollabEdit must equal.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable

from fedit import progress
from fedit.collab.client import CollabClient, PublishedModel
from fedit.collab.config import CollabConfig, for_form
from fedit.collab.merge import solve, sum_stats
from fedit.collab.plan import PlanError, split_plan
from fedit.collab.reference import global_reference, reference_rounds, resolutions_for
from fedit.collab.report import annotate, attach_reference, relative_diff, round_entry, summary
from fedit.collab.rounds import Edited, Solver, run_merges
from fedit.collab.state import CollabState, add_layers

log = logging.getLogger(__name__)

__all__ = ["CollabConfig", "LocalExchange", "PlanError", "annotate", "attach_reference", "global_reference",
           "relative_diff", "round_entry", "run_collab", "split_plan"]


def _each(clients, step: str):
    """The clients (or (client, x) pairs) one by one, with a progress task "<step>: clients" naming
    the client now working; its own tasks (target vectors, measuring) nest below."""
    items = list(clients)
    return progress.each(items, f"{step}: clients", unit="client",
                         label=lambda c: (c[0] if isinstance(c, tuple) else c).id)


class LocalExchange:
    """The round loop's questions answered by ``CollabClient`` objects in this process."""

    def __init__(self, clients: list[CollabClient], model: PublishedModel, solver: Solver):
        self.clients, self.model, self.solver = clients, model, solver
        self._prepared: dict[str, Any] = {}

    def digests(self, rnd):
        return {c.id: c.digests(rnd) for c in self.clients}

    def prepare(self, rnd, keep, state: CollabState):
        self.model.set(state.version, state.delta)
        self._prepared = {c.id: c.prepare(rnd, keep[c.id]) for c in _each(self.clients, "prepare")}
        return {c.id: Edited(p.used, [c.round_records(rnd)[i].request.case_id for i in p.vanished], p.seconds)
                for c, p in zip(self.clients, self._prepared.values())}

    def summed_stats(self, rnd, keep, state):
        return sum_stats([c.shared_stats(rnd, p) for c, p in zip(self.clients, self._prepared.values())])

    def updates(self, rnd, keep, state):
        stats = [p.stats() for p in self._prepared.values()]
        return ([solve(s, self.solver.C0, self.solver.lam) if s else {} for s in stats],
                [float(p.n) for p in self._prepared.values()])

    def layer_stats(self, rnd, keep, state, step, below):
        self.model.set(f"{state.version}+r{rnd + 1}l{step}", add_layers(state.delta, below))
        parts = [c.layer_stats(rnd, p, step) for c, p in _each(zip(self.clients, self._prepared.values()), "layer")]
        l = self.solver.layers[step]
        return sum_stats([{l: s} for s in parts if s is not None])[l]

    def evaluate(self, rnd, state, applied):
        self.model.set(state.version, state.delta)
        for c in self.clients:
            c.kept = dict(applied.get(c.id, {}))
        return {c.id: c.evaluate(rnd) for c in _each(self.clients, "evaluate")}


def run_collab(lm, plan: dict[str, list[list]], hparams, resources, cfg: CollabConfig | None = None,
               progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run CollabEdit (and/or the baselines) in-process; returns the report dict.

    ``plan``: client id → one list of EvalRecords per round (all clients the same number of
    rounds). The model is back at its base weights at the end.
    """
    cfg = cfg or CollabConfig()
    say = progress or (lambda s: log.info(s))
    t_all = time.perf_counter()
    rounds = {len(v) for v in plan.values()}
    if len(rounds) != 1:
        raise PlanError(f"clients have different numbers of rounds: { {c: len(v) for c, v in plan.items()} }.",
                        "give every client one list of facts per round.")
    R = rounds.pop()
    hp = for_form(hparams, cfg.form)
    published = PublishedModel(lm)
    clients = [CollabClient(c, published, hp, resources, recs, cfg.salt, cfg.residual_tol, cfg.dataset)
               for c, recs in plan.items()]
    for c in clients:
        c.dp, c.noise_seed = cfg.dp, os.urandom(32)
    try:
        say("measuring every fact on the base model")
        for c in _each(clients, "base-model measurement"):
            c.pre_scores()
        solver = Solver(resources.second_moments(lm, hp.layers, hp.mom2_samples, hp.mom2_seq_len),
                        hp.mom2_update_weight, list(hp.layers))
        reference = None
        if cfg.reference:
            reference = reference_rounds(lm, clients, resolutions_for(clients, R, cfg), hp, resources, solver.C0,
                                         cfg, say)
        done = run_merges(LocalExchange(clients, published, solver), R, cfg, solver, say)
    finally:
        published.reset()
    report = summary("local", list(plan), R, cfg.merges, [r.to_dict() for r in done["resolutions"]], done["runs"])
    report["resolution"] = [annotate(r, plan, t) for t, r in enumerate(report["resolution"])]
    report.update(model=lm.name, dataset=cfg.dataset, per_client=[len(plan[c][0]) for c in plan][0] if plan else 0,
                  config=cfg.to_dict(), hparams=dataclasses.asdict(hp), reference=None)
    if reference is not None:
        attach_reference(report, reference, done["deltas"], cfg.form)
    report["seconds"] = round(time.perf_counter() - t_all, 3)
    return report
