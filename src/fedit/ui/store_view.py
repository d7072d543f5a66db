"""Browse a federation's MKV store, read-only: clients, slots, stored facts and FedEdit hits."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import torch

from fedit.errors import FeditError

MAX_ROWS = 200  # stored MKVs listed per slot


def resolve_store(path: str) -> Path:
    """The store file: ``path`` itself, or ``mkv.sqlite`` in a ``fedit fed run --out`` folder.
    Never creates anything (opening a missing path with MKVStore would)."""
    text = str(path or "").strip()
    if not text:
        raise FeditError("give the path of an MKV store.", "e.g. the mkv.sqlite in a `fedit fed run --out` folder.")
    p = Path(text).expanduser()
    if p.is_dir():
        p = p / "mkv.sqlite"
    if not p.is_file():
        raise FeditError(f"{p} does not exist.", "give the mkv.sqlite file (or the --out folder) of a federated run.")
    return p


def _slots(path: Path) -> list[int]:
    """Distinct slots holding MKVs, from a read-only connection (the store has no listing call)."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return [r[0] for r in conn.execute("SELECT DISTINCT slot FROM mkvs ORDER BY slot")]
    except sqlite3.Error as e:
        raise FeditError(f"cannot read the slots of {path} ({e}).", "give an MKV store written by fedit.") from e
    finally:
        conn.close()


def _fact(meta: dict) -> dict:
    req = meta.get("request") or {}
    filled = req["prompt"].replace("{}", req["subject"]) if "prompt" in req and "subject" in req else None
    return {"fact": meta.get("fact"), "request": filled, "target": req.get("target_new")}


def browse(path: str, tau: float | None = None) -> dict:
    """Clients (info, MKVs per slot), slots, the MKVs of each slot (first :data:`MAX_ROWS`) and, per
    slot, FedEdit's hits between clients: ``hits[slot][a][b]`` = how many of ``b``'s MKVs pass
    the retrieval rule for ``a``'s own MKVs of that slot at threshold ``tau``."""
    from fedit.federation.retrieval import DEFAULT_TAU
    from fedit.federation.store import MKVStore

    tau = DEFAULT_TAU if tau is None else float(tau)
    if not -1.0 <= tau <= 1.0:
        raise FeditError(f"tau must lie in [-1, 1] (a cosine), got {tau}.", "use e.g. 0.4.")
    p = resolve_store(path)
    slots = _slots(p)
    with MKVStore(p) as store:  # only reading calls below
        clients = store.clients()
        info = {c: store.client_info(c) for c in clients}
        per_slot, hits = {}, {}
        for s in slots:
            mkvs = store.for_slot(s)
            per_slot[s] = [{"id": m.id, "owner": m.owner, "norm": round(float(m.vector.norm()), 3), **_fact(m.meta)}
                           for m in mkvs[:MAX_ROWS]]
            hits[s] = {}
            for a in clients:
                own = [m.vector for m in mkvs if m.owner == a]
                if not own:
                    continue
                row = {b: 0 for b in clients if b != a}
                for h in store.retrieve_fededit(a, s, torch.stack(own), tau=tau):
                    row[h.mkv.owner] += 1
                hits[s][a] = row
        counts = {c: {s: store.count(slot=s, owner=c) for s in slots} for c in clients}
        return {"path": str(p), "dim": store.dim, "tau": tau, "total": store.count(), "slots": slots,
                "clients": [{"id": c, "info": info[c], "per_slot": counts[c]} for c in clients],
                "mkvs": per_slot, "hits": hits}
