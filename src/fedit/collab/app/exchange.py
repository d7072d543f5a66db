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
from fedit.federation.flower import Roster, ask, layers_to_arrays, to_tensors
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
        self.roster = Roster(nodes, self.ids, fail=_fail)  # who is still answering; who went missing where
        self._rnd = 0
        self._counts: dict[int, int] = {}  # facts per node in the prepared edit
        self._salted = False
        self.left_out: dict[int, list[str]] = {}  # round -> clients left out of the current method's sum

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

    def _agree_salt(self) -> None:
        """The clients agree a digest salt (``collab.keys``); this server relays only public keys
        and sealed salts. The leader is the node with the lowest id."""
        got = self._ask("query.keys", {})
        publics = {nid: str(r.config_records["collab"]["public"]) for nid, r in got.items()}
        leader = min(got)
        others = [n for n in got if n != leader]
        keys = ConfigRecord({"keys": json.dumps({str(n): publics[n] for n in others})})
        sealed = ask(self.grid, [leader], "query.seal", {leader: RecordDict({"collab": keys})}, group="query.seal",
                     fail=_fail)[leader].config_records["collab"]["sealed"]
        boxes = json.loads(str(sealed))
        ask(self.grid, others, "query.open", {n: RecordDict({"collab": ConfigRecord({"from": publics[leader], "sealed": boxes[str(n)]})})
                                              for n in others}, group="query.open", fail=_fail)
        self._salted = True

    def digests(self, rnd: int) -> dict[str, list[FactDigest]]:
        self._rnd = rnd
        if not self._salted:
            self._agree_salt()
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
        self.left_out.pop(rnd, None)
        got = self._ask("query.prepare", self._asked(rnd, state), state)
        cfgs = {self.ids[nid]: r.config_records["collab"] for nid, r in got.items()}
        self._exponents = [json.loads(str(c["exponents"])) for c in cfgs.values()]
        out = {c: Edited(json.loads(str(v["used"])), json.loads(str(v["vanished"])), float(v["seconds"]))
               for c, v in cfgs.items()}
        self._counts = {nid: len(out[self.ids[nid]].used) for nid in self.nodes}
        return {self.ids[nid]: out[self.ids[nid]] for nid in self.order}

    def summed_stats(self, rnd: int, keep: dict[str, list[int]], state: CollabState) -> dict[int, LayerSums]:
        if self.s.secagg:
            exps = {n: max(int(p.get(n, NO_EXPONENT)) for p in self._exponents) for n in self._exponents[0]}
            total, info = secure_sum(self.grid, self.context, self.nodes, rnd, self._asked(rnd, state), self.layout,
                                     exps, self._counts, self.s.secagg_shares, self.s.secagg_threshold)
            self._log(rnd, info)
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
        counts = {nid: int(r.config_records["collab"]["n"]) for nid, r in got.items()}
        exps = {k: max(int(p.get(k, NO_EXPONENT)) for p in parts) for k in parts[0]}
        total, info = secure_sum(self.grid, self.context, self.nodes, rnd, values, ([l], {l: self.layout[1][l]}),
                                 exps, counts, self.s.secagg_shares, self.s.secagg_threshold)
        if info["dropped"]:  # the lower layers already hold its facts: a partial sum would not be MEMIT
            raise CollabError(f"clients {[self.ids[n] for n in info['dropped']]} dropped out at layer {l}.",
                              "the layer-sequential form needs every client at every layer; rerun the round.")
        self.secure_log.append({"method": "collabedit", "round": rnd + 1, "layer": l, **self._named(info)})
        return total[l]

    def _named(self, info: dict[str, Any]) -> dict[str, Any]:
        """A SecAgg+ log entry naming clients, not node ids."""
        return {**info, "summed": sorted(self.ids[n] for n in info["summed"]),
                "dropped": sorted(self.ids[n] for n in info["dropped"])}

    def _log(self, rnd: int, info: dict[str, Any]) -> None:
        """Keep the SecAgg+ log entry, and who was left out of this round's sum."""
        info = self._named(info)
        self.left_out[rnd] = info["dropped"]
        self.secure_log.append({"method": "collabedit", "round": rnd + 1, **info})

    def left_out_by_round(self) -> dict[str, list[str]]:
        """{round (1-based): clients dropped out of its secure sum}, rounds with a dropout only."""
        return {str(e["round"]): e["dropped"] for e in self.secure_log if e.get("dropped")}

    def dropped(self, rnd: int) -> list[str]:
        """Clients whose statistics are not in round ``rnd``'s sum (dropped out during SecAgg+)."""
        return list(self.left_out.get(rnd, []))

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


def privacy_of(s: CollabSettings, layers: int) -> dict[str, Any] | None:
    """The DP guarantee of the run's sums (``collab.privacy.accounting``), or None without DP."""
    from fedit.collab.privacy import accounting

    dp = s.dp()
    return accounting(dp, layers) if dp is not None else None


def _stats_of(content: RecordDict) -> dict[int, LayerSums]:
    ts: dict[str, torch.Tensor] = to_tensors(content.array_records.get("stats"))
    n = int(content.config_records["collab"]["n"])
    layers = sorted(int(k[3:]) for k in ts if k.startswith("rk."))
    return {l: LayerSums(ts[f"rk.{l}"].double(), ts[f"kk.{l}"].double(), n) for l in layers}
