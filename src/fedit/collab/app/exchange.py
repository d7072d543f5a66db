"""The round loop's questions (``collab.rounds.Exchange``) as Flower messages to the client nodes."""

from __future__ import annotations

import json
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, RecordDict

from fedit.collab.app.secagg import secure_sum
from fedit.collab.client import CollabError
from fedit.collab.merge import sum_stats
from fedit.collab.protocol import FactDigest
from fedit.collab.rounds import ClientsLost, Edited
from fedit.collab.secure import NO_EXPONENT
from fedit.collab.settings import CollabSettings
from fedit.collab.state import CollabState, add_layers
from fedit.federation.flower import Roster, layers_to_arrays, to_tensors
from fedit.methods.vectors import LayerSums


def _fail(why: str) -> CollabError:
    return CollabError(why, "see the client's log; check that every node is running.")


class FlowerExchange:
    """Asks the client ``nodes`` through ``grid``; remembers their client ids and order."""

    def __init__(self, grid, context: Context, nodes: list[int], s: CollabSettings,
                 layout: tuple[list[int], dict[int, tuple[int, int]]]):
        self.grid, self.context, self.nodes, self.s, self.layout = grid, context, nodes, s, layout
        self.ids: dict[int, str] = {}
        self.order: list[int] = list(nodes)
        self.secure_log: list[dict[str, Any]] = []
        self._keep: dict[str, list[int]] = {}
        self._exponents: list[dict[str, int]] = []
        self._n = 0
        self.roster = Roster(nodes, self.ids, fail=_fail)  # who is still answering; who went missing where
        self._rnd = 0

    def _ask(self, kind: str, values, state: CollabState | None = None,
             delta: dict[int, torch.Tensor] | None = None) -> dict[int, RecordDict]:
        """Ask every node; the published model goes along as ``state.delta`` (or ``delta``)."""
        delta = state.delta if state is not None else delta
        contents = {}
        for nid in self.nodes:
            contents[nid] = RecordDict({"collab": ConfigRecord(values(nid) if callable(values) else values)})
            if delta is not None:
                contents[nid]["state"] = layers_to_arrays(delta)
        got = self.roster.ask(self.grid, kind, contents.__getitem__, group=kind, round=self._rnd + 1)
        if len(self.roster.nodes) < len(self.nodes):  # a node is gone: go on without it
            self.nodes = list(self.roster.nodes)
            self.order = [n for n in self.order if n in self.nodes]
            if kind != "evaluate":  # before the merge: the round is redone without it
                raise ClientsLost(kind)
        return got

    def _asked(self, rnd: int, state: CollabState):
        return lambda nid: {"round": rnd, "keep": json.dumps(self._keep[self.ids[nid]]), "version": state.version}

    def digests(self, rnd: int) -> dict[str, list[FactDigest]]:
        self._rnd = rnd
        got = {nid: r.config_records["collab"] for nid, r in self._ask("query.digest", {"round": rnd}).items()}
        self.ids = self.roster.ids = {nid: str(c["client"]) for nid, c in got.items()}
        prints = {str(c["fingerprint"]) for c in got.values()}
        if len(prints) != 1:
            raise CollabError(f"clients hold different base models (fingerprints {sorted(prints)}).",
                              "every client must start from the same base model.")
        self.order = sorted(self.nodes, key=lambda nid: int(got[nid]["order"]))
        return {self.ids[nid]: [FactDigest(str(k), str(v)) for k, v in zip(got[nid]["keys"], got[nid]["targets"])]
                for nid in self.order}

    def prepare(self, rnd: int, keep: dict[str, list[int]], state: CollabState) -> dict[str, Edited]:
        self._keep = keep
        got = self._ask("query.prepare", self._asked(rnd, state), state)
        cfgs = {self.ids[nid]: r.config_records["collab"] for nid, r in got.items()}
        self._exponents = [json.loads(str(c["exponents"])) for c in cfgs.values()]
        out = {c: Edited(json.loads(str(v["used"])), json.loads(str(v["vanished"])), float(v["seconds"]))
               for c, v in cfgs.items()}
        self._n = sum(len(e.used) for e in out.values())
        return {self.ids[nid]: out[self.ids[nid]] for nid in self.order}

    def summed_stats(self, rnd: int, keep: dict[str, list[int]], state: CollabState) -> dict[int, LayerSums]:
        if self.s.secagg:
            exps = {n: max(int(p.get(n, NO_EXPONENT)) for p in self._exponents) for n in self._exponents[0]}
            total, info = secure_sum(self.grid, self.context, self.nodes, rnd, self._asked(rnd, state), self.layout,
                                     exps, self._n, self.s.secagg_shares, self.s.secagg_threshold)
            self.secure_log.append({"method": "collabedit", "round": rnd + 1, **info})
            return total
        got = self._ask("query.stats", self._asked(rnd, state), state)
        return sum_stats([_stats_of(r) for r in got.values()])

    def layer_stats(self, rnd: int, keep: dict[str, list[int]], state: CollabState, step: int,
                    below: dict[int, torch.Tensor]) -> LayerSums:
        l = self.layout[0][step]
        asked = self._asked(rnd, state)

        def values(nid):
            return {**asked(nid), "step": step, "layer_version": f"{state.version}+r{rnd + 1}l{step}"}

        got = self._ask("query.layer", values, delta=add_layers(state.delta, below))
        if not self.s.secagg:
            return sum_stats([_stats_of(r) for r in got.values()])[l]
        parts = [json.loads(str(r.config_records["collab"]["exponents"])) for r in got.values()]
        n = sum(int(r.config_records["collab"]["n"]) for r in got.values())
        exps = {k: max(int(p.get(k, NO_EXPONENT)) for p in parts) for k in parts[0]}
        total, info = secure_sum(self.grid, self.context, self.nodes, rnd, values, ([l], {l: self.layout[1][l]}),
                                 exps, n, self.s.secagg_shares, self.s.secagg_threshold)
        self.secure_log.append({"method": "collabedit", "round": rnd + 1, "layer": l, **info})
        return total[l]

    def updates(self, rnd: int, keep: dict[str, list[int]], state: CollabState):
        got = self._ask("query.delta", self._asked(rnd, state), state)
        deltas = [{int(k[2:]): v.double() for k, v in to_tensors(r.array_records.get("stats")).items()}
                  for r in got.values()]
        return deltas, [float(r.config_records["collab"]["n"]) for r in got.values()]

    def evaluate(self, rnd: int, state: CollabState, applied) -> dict[str, dict[int, dict]]:
        def values(nid):
            mine = applied.get(self.ids[nid], {})
            return {"version": state.version, "upto": rnd, "applied": json.dumps({str(k): v for k, v in mine.items()})}

        got = self._ask("evaluate", values, state)
        return {self.ids[nid]: {int(k): v for k, v in json.loads(str(got[nid].config_records["collab"]["metrics"])).items()}
                for nid in self.order if nid in got}


def _stats_of(content: RecordDict) -> dict[int, LayerSums]:
    ts: dict[str, torch.Tensor] = to_tensors(content.array_records.get("stats"))
    n = int(content.config_records["collab"]["n"])
    layers = sorted(int(k[3:]) for k in ts if k.startswith("rk."))
    return {l: LayerSums(ts[f"rk.{l}"].double(), ts[f"kk.{l}"].double(), n) for l in layers}
