"""What clients reveal about their facts, and how the server finds overlaps and conflicts.

Before anything is computed, each client sends, per fact of the round, a *digest*:

    key    = HMAC-SHA256(salt, normalised subject ␟ relation)
    target = HMAC-SHA256(salt, key ␟ normalised target_new)

``salt`` is a secret shared by the clients and not by the server (the operator hands it to the
organisations out of band). The server compares digests: equal keys are the same
(subject, relation); equal keys with equal targets are the same fact (an **overlap**, counted
once); equal keys with different targets are a **conflict**, settled by the operator's policy.
The relation is the dataset's relation id where there is one (CounterFact's ``P19``), else the
prompt template with ``{}`` (two prompts worded differently are then different relations).

What this reveals to the server: how many facts each client edits per round, which facts two
clients share and which they dispute, and which facts repeat an earlier round's — not the
text. Without the salt, a server that guesses a (subject, relation, target) cannot test the
guess. A server that colludes with one client (who knows the salt) can: it can then test any
guessed fact against every client's digests. Facts are also linkable across rounds.
"""

from __future__ import annotations

import hashlib
import hmac
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from fedit.errors import FeditError

POLICIES = ("reject", "first", "majority", "priority")


class ProtocolError(FeditError):
    """Digests or policies that the server cannot act on."""


def normalise(text: str) -> str:
    """Case-folded, Unicode-normalised, single-spaced text."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def relation_of(prompt: str, relation_id: str | None = None) -> str:
    """The relation of a fact: its relation id, else its prompt template (with ``{}``)."""
    return f"id:{relation_id.strip()}" if relation_id and relation_id.strip() else f"template:{normalise(prompt)}"


@dataclass(frozen=True)
class FactDigest:
    key: str  # (subject, relation)
    target: str  # (subject, relation, target_new)


def digest(subject: str, relation: str, target: str, salt: bytes) -> FactDigest:
    if not salt:
        raise ProtocolError("the digest salt is empty.", "give the clients a shared secret salt (e.g. 32 random bytes).")
    key = hmac.new(salt, f"{normalise(subject)}\x1f{relation}".encode(), hashlib.sha256).hexdigest()
    tgt = hmac.new(salt, f"{key}\x1f{normalise(target)}".encode(), hashlib.sha256).hexdigest()
    return FactDigest(key, tgt)


def digest_records(records, salt: bytes) -> list[FactDigest]:
    """Digests of EvalRecords (``.request`` and ``.relation_id``) or of EditRequests."""
    out = []
    for r in records:
        req = getattr(r, "request", r)
        out.append(digest(req.subject, relation_of(req.prompt, getattr(r, "relation_id", None)), req.target_new, salt))
    return out


@dataclass
class Resolution:
    """The server's decision for one round.

    ``keep[c]``: indices (into client c's list) of the facts c must edit. ``duplicates``: one
    entry per fact counted once although several copies were sent (same round or already
    applied in an earlier round). ``conflicts``: one entry per disputed (subject, relation).
    """

    keep: dict[str, list[int]]
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    conflicts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n_duplicates(self) -> int:
        """Copies dropped because the same fact was already counted."""
        return sum(len(d["dropped"]) for d in self.duplicates)

    @property
    def n_rejected(self) -> int:
        """Facts dropped by conflict resolution."""
        return sum(len(c["rejected"]) for c in self.conflicts)

    def to_dict(self) -> dict[str, Any]:
        return {"keep": self.keep, "duplicates": self.duplicates, "conflicts": self.conflicts,
                "n_duplicates": self.n_duplicates, "n_conflicts": len(self.conflicts), "n_rejected": self.n_rejected}


def _short(h: str) -> str:
    return h[:12]


def resolve(submissions: dict[str, list[FactDigest]], policy: str = "reject", priority: list[str] | None = None,
            applied: dict[str, tuple[str, int]] | None = None) -> Resolution:
    """Decide which facts each client edits this round.

    ``submissions``: client id → digests, in the clients' order (the order "first" uses).
    ``applied``: key → (target digest, round) of facts applied in earlier rounds.

    Within a round, a (subject, relation) sent with one target is kept once (the first copy in
    client order); sent with several targets it is a conflict, settled by ``policy``:

    - ``reject``: no target is edited; the conflict is reported.
    - ``first``: the target of the first client (in client order) that sent the key wins.
    - ``majority``: the target sent by most clients wins; a tie rejects all.
    - ``priority``: the target of the client highest in ``priority`` wins; clients not listed
      rank below the listed ones, in client order.

    A fact already applied in an earlier round with the same target is a duplicate (dropped).
    With a different target it is reported as a conflict and rejected under every policy: the
    applied edit's keys stay in C₁ and keep their outputs, so a later round cannot overwrite
    them with a plain edit.
    """
    order = list(submissions)
    rank = _ranks(order, policy, priority)
    applied = applied or {}
    keep: dict[str, list[int]] = {c: [] for c in order}
    res = Resolution(keep=keep)
    for key, facts in _groups(submissions).items():
        facts.sort(key=lambda f: (rank[f[0]], f[1]))
        targets: dict[str, list[tuple[str, int]]] = {}
        for c, i, t in facts:
            targets.setdefault(t, []).append((c, i))
        by_target = [{"target": _short(t), "clients": sorted({c for c, _ in fs}, key=order.index),
                      "facts": [[c, i] for c, i in fs]} for t, fs in targets.items()]
        if key in applied:
            _against_applied(res, key, applied[key], targets, by_target, policy)
            continue
        winner, resolution = _winner(facts, targets, policy)
        kept = targets[winner][0] if winner is not None else None
        if kept is not None:
            keep[kept[0]].append(kept[1])
            copies = [[c, i] for c, i in targets[winner][1:]]
            if copies:
                res.duplicates.append({"key": _short(key), "kept": list(kept), "dropped": copies, "kind": "same round"})
        if resolution is not None:
            rejected = [[c, i] for t, fs in targets.items() if t != winner for c, i in fs]
            res.conflicts.append({"key": _short(key), "targets": by_target, "policy": policy,
                                  "resolution": resolution, "kept": list(kept) if kept else None, "rejected": rejected})
    for c in keep:
        keep[c].sort()
    return res


def _ranks(order: list[str], policy: str, priority: list[str] | None) -> dict[str, Any]:
    """Each client's rank under ``policy`` (lower wins "first" and "priority")."""
    if policy not in POLICIES:
        raise ProtocolError(f"unknown conflict policy {policy!r}.", f"use one of {', '.join(POLICIES)}.")
    if policy != "priority":
        return {c: i for i, c in enumerate(order)}
    if not priority:
        raise ProtocolError("the 'priority' policy needs an ordered list of clients.",
                            f"pass it, e.g. --priority {','.join(order[:3])}.")
    unknown = [c for c in priority if c not in order]
    if unknown:
        raise ProtocolError(f"the priority list names unknown clients {unknown}.", f"use ids among {order}.")
    listed = {c: i for i, c in enumerate(priority)}
    return {c: (listed.get(c, len(listed)), i) for i, c in enumerate(order)}


def _groups(submissions: dict[str, list[FactDigest]]) -> dict[str, list[tuple[str, int, str]]]:
    """key -> [(client, index, target digest)] over every client's submissions."""
    groups: dict[str, list[tuple[str, int, str]]] = {}
    for c, digests in submissions.items():
        for i, d in enumerate(digests):
            if not isinstance(d, FactDigest):
                raise ProtocolError(f"client {c} sent a malformed digest at position {i}.",
                                    "send (key, target) hex digests from fedit.collab.protocol.digest.")
            groups.setdefault(d.key, []).append((c, i, d.target))
    return groups


def _against_applied(res: Resolution, key: str, applied: tuple[str, int], targets, by_target, policy: str) -> None:
    """A key applied in an earlier round: the same target is a duplicate, another a rejected conflict."""
    t0, rnd = applied
    same = targets.get(t0, [])
    other = [f for t, fs in targets.items() if t != t0 for f in fs]
    if same:
        res.duplicates.append({"key": _short(key), "kept": None, "dropped": [[c, i] for c, i in same],
                               "kind": f"applied in round {rnd}"})
    if other:
        res.conflicts.append({"key": _short(key), "targets": [b for b in by_target if b["target"] != _short(t0)],
                              "applied_target": _short(t0), "applied_round": rnd, "policy": policy,
                              "resolution": f"rejected: the fact was applied with another target in round {rnd}",
                              "kept": None, "rejected": [[c, i] for c, i in other]})


def _winner(facts: list[tuple[str, int, str]], targets: dict[str, list], policy: str) -> tuple[str | None, str | None]:
    """(winning target digest or None, the conflict's resolution text or None when no conflict)."""
    if len(targets) == 1:
        return next(iter(targets)), None
    if policy == "reject":
        return None, "rejected: the clients disagree"
    if policy in ("first", "priority"):
        return facts[0][2], f"{policy}: kept the target of {facts[0][0]}"  # facts are sorted by rank
    support = {t: len({c for c, _ in fs}) for t, fs in targets.items()}  # majority
    best = max(support.values())
    tops = [t for t, n in support.items() if n == best]
    if len(tops) > 1:
        return None, f"rejected: tie at {best} client(s) each"
    return tops[0], f"majority: kept the target sent by {best} of {len({c for c, _, _ in facts})} clients"
