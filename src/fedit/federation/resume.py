"""Catching up a FedEdit client that went missing mid-run (its node killed, crashed, cut off).

The run it missed went on without it and wrote ``federation.json`` with a ``missing`` list
(client, slot, step, why). A rerun with the same settings plus ``resume=true`` (same ``out`` and
store) catches those clients up: each, back on its node, redoes every slot from the base model —
a node's edits live in its run's state, which died with it — and for each slot its MKVs are
stored unless the store already holds them (uploaded before it went missing), and it reuses the
hits the store gives it among the other clients' MKVs of that slot, which the store kept. The
other clients are not asked again: they keep the edits of their run (the late client's MKVs of
the slots they finished without it wait in the store for a later run). The results are merged
into the same ``federation.json``. No Flower here: the Flower side is ``app.server_app``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedit.federation.settings import SettingsError


# The settings that make a run what it is: a catch-up must use the same (the others may differ:
# evaluate, threads, caches, timeouts).
SAME = ("model", "dataset", "data", "clients", "n-per-client", "slots", "partition", "seed", "method", "overrides",
        "hparams-file", "mode", "share-requests", "tau", "match", "store")


def previous_run(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The ``federation.json`` of the run to catch up on; refused when there is none, nobody is
    missing, or ``settings`` (a user config) differ from its own in what defines the run."""
    f = Path(out) / "federation.json"
    if not f.is_file():
        raise SettingsError(f"resume=true but {f} does not exist: there is no finished run to catch up on.",
                            "run without resume first, or point out= at the earlier run's folder.")
    previous = json.loads(f.read_text())
    if not to_catch_up(previous):
        raise SettingsError(f"resume=true but no client of the run in {out} is missing.",
                            "nothing to do; run without resume to start a new run.")
    differ = {k: (previous["settings"].get(k), settings.get(k)) for k in SAME
              if previous["settings"].get(k) != settings.get(k)}
    if differ:
        raise SettingsError(f"resume=true with settings that differ from the run in {out}: "
                            + ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in differ.items()) + ".",
                            "rerun with the earlier run's run config plus resume=true.")
    return previous


def to_catch_up(previous: dict[str, Any]) -> list[str]:
    """Client ids the earlier run lists as missing and not caught up since, in run order."""
    gone = {m["client"] for m in previous.get("missing", []) if not m.get("caught_up")}
    return [c for c in previous.get("clients", []) if c in gone]


def merge(previous: dict[str, Any], caught: dict[str, Any], still_missing: list[dict[str, Any]],
          clients: list[str], seconds: float) -> dict[str, Any]:
    """``previous`` with the catch-up run's ``caught`` (``_fededit``'s result for the returning
    ``clients``) merged in: their slots' uploads, hits and reuse, their evaluation, the store's
    count; their ``missing`` entries marked ``caught_up`` unless they went missing again."""
    out = json.loads(json.dumps(previous))  # a deep copy
    again = {m["client"] for m in still_missing}
    by_slot = {e["slot"]: e for e in out["slots"]}
    for e in caught["slots"]:
        mine = by_slot[e["slot"]]
        for k in ("uploaded", "hits", "reuse"):
            mine[k].update(e[k])
    out["mkvs_stored"] = caught["mkvs_stored"]
    if "fededit" in caught:
        out.setdefault("fededit", {}).update(caught["fededit"])
    for m in out.get("missing", []):
        if m["client"] in clients and m["client"] not in again:
            m["caught_up"] = True
    out.setdefault("missing", []).extend({**m, "catch_up": True} for m in still_missing)
    out.setdefault("catch_ups", []).append({"clients": clients, "seconds": round(seconds, 3)})
    return out
