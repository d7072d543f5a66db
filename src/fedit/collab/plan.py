"""Splitting a dataset's records among CollabEdit's clients and rounds (the same on every node)."""

from __future__ import annotations

import dataclasses
import random

from fedit.errors import FeditError


class PlanError(FeditError):
    """Facts that cannot be split among clients and rounds as asked."""


def records_needed(clients: int, rounds: int, per_client: int, overlap: float = 0.0, conflict: float = 0.0) -> int:
    """How many distinct records ``split_plan`` takes from the front of a dataset."""
    n_own = per_client - round(overlap * per_client) - round(conflict * per_client)
    return max(1, clients * rounds * max(1, n_own))


def split_plan(records: list, clients: int, rounds: int, per_client: int, overlap: float = 0.0,
               conflict: float = 0.0, seed: int = 0) -> dict[str, list[list]]:
    """Client id ("c0", "c1", …) → rounds → records, from the dataset's records in order.

    Each client gets ``per_client`` facts per round. A fraction ``overlap`` of them are copies
    of another client's facts of the same round (duplicates to be counted once), a fraction
    ``conflict`` are another client's facts with a different target (conflicts).
    """
    if clients < 1 or rounds < 1 or per_client < 1:
        raise PlanError(f"clients, rounds and per-client facts must be ≥ 1 (got {clients}, {rounds}, {per_client}).",
                        "e.g. --clients 10 --rounds 1 --per-client 50")
    for name, f in (("overlap", overlap), ("conflict", conflict)):
        if not 0.0 <= f <= 1.0:
            raise PlanError(f"{name} must lie in [0, 1], got {f}.", "give the fraction of each client's facts, e.g. 0.1.")
    n_dup, n_conf = round(overlap * per_client), round(conflict * per_client)
    n_own = per_client - n_dup - n_conf
    if (n_dup or n_conf) and clients < 2:
        raise PlanError("overlaps and conflicts need at least two clients.", "use --clients 2 or more.")
    if n_own < max(1, n_dup + n_conf):
        raise PlanError(f"with {per_client} facts per client, {n_dup} copies and {n_conf} conflicts leave "
                        f"{n_own} own facts, too few to copy from.", "lower --overlap/--conflict or raise --per-client.")
    need = clients * rounds * n_own
    if len(records) < need:
        raise PlanError(f"the plan needs {need} distinct records, the dataset has {len(records)}.",
                        "use fewer clients, rounds or facts per client, or a larger dataset (--data).")
    rng = random.Random(seed)
    ids = [f"c{i}" for i in range(clients)]
    own = {(c, r): records[(r * clients + i) * n_own:(r * clients + i + 1) * n_own]
           for r in range(rounds) for i, c in enumerate(ids)}
    targets = sorted({rec.request.target_new for rec in records[:need]})
    plan: dict[str, list[list]] = {c: [] for c in ids}
    for r in range(rounds):
        for i, c in enumerate(ids):
            other = own[(ids[(i + 1) % clients], r)]
            facts = list(own[(c, r)]) + list(other[:n_dup])
            for rec in other[n_dup:n_dup + n_conf]:
                choices = [t for t in targets if t.casefold() != rec.request.target_new.casefold()
                           and t != rec.request.target_true]
                if not choices:
                    raise PlanError("no other target to make a conflict from.", "use a dataset with several targets.")
                req = dataclasses.replace(rec.request, target_new=rng.choice(choices))
                facts.append(dataclasses.replace(rec, request=req))
            plan[c].append(facts)
    return plan
