"""The in-process CollabEdit engine with its merged Δ in hand (``run_collab`` returns only the
report): the same clients, reference and round loop as ``fedit.collab.driver.run_collab``."""

from fedit.collab.client import CollabClient, PublishedModel
from fedit.collab.config import for_form
from fedit.collab.driver import LocalExchange
from fedit.collab.reference import reference_rounds, resolutions_for
from fedit.collab.rounds import Solver, run_merges


def run_local(lm, plan, hparams, res, cfg, reference: bool = True):
    """(reference_rounds' result or None, run_merges' result, clients, solver); the model is at its
    base weights on return, the clients keep their prepared edits (a second call may reuse them)."""
    hp = for_form(hparams, cfg.form)
    published = PublishedModel(lm)
    clients = [CollabClient(c, published, hp, res, recs, cfg.salt, cfg.residual_tol) for c, recs in plan.items()]
    rounds = len(next(iter(plan.values())))
    try:
        for c in clients:
            c.pre_scores()
        solver = Solver(res.second_moments(lm, hp.layers, hp.mom2_samples, hp.mom2_seq_len), hp.mom2_update_weight,
                        list(hp.layers))
        ref = (reference_rounds(lm, clients, resolutions_for(clients, rounds, cfg), hp, res, solver.C0, cfg,
                                lambda s: None) if reference else None)
        done = run_merges(LocalExchange(clients, published, solver), rounds, cfg, solver)
    finally:
        published.reset()
    return ref, done, clients, solver


def max_relative(a: dict, b: dict) -> float:
    """max |a − b| over max |b|, across the layers of two per-layer updates."""
    assert sorted(a) == sorted(b) and b
    return (max(float((a[l].double() - b[l].double()).abs().max()) for l in b)
            / max(float(b[l].double().abs().max()) for l in b))
