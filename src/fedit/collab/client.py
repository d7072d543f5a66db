"""One organisation's side of CollabEdit, free of any federation engine.

A client holds its facts per round and a model that carries the change the server published
so far (``PublishedModel``). Per round it (1) sends digests of its facts (``protocol``), (2) edits
the facts the server lets it keep: optimises their targets and measures keys and residuals on
the current model (base-form MEMIT, ``methods.vectors``), dropping facts whose residual has
already vanished (the model already says them), (3) uploads the per-layer sums R Kᵀ and K Kᵀ
(CollabEdit) or its own update Δᵢ (baselines), and (4) measures its own facts on the merged
model. Several clients may share one ``PublishedModel`` (one model in memory), since all of them
see the same published model.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from fedit.collab.protocol import FactDigest, digest_records
from fedit.deltas import AppliedEdit, WeightDeltas
from fedit.errors import FeditError
from fedit.evaluate.runner import measure, record_metrics
from fedit.methods.vectors import EditVectors, LayerSums, check_finite, compute_vectors, layer_sums


class CollabError(FeditError):
    """A collaborative run that cannot go on as asked."""


class PublishedModel:
    """A model plus the published change it carries; ``set`` moves it to another state."""

    def __init__(self, lm):
        self.lm = lm
        self.version = "base"
        self._applied: AppliedEdit | None = None

    def weight_deltas(self, delta: dict[int, torch.Tensor], method: str = "collabedit") -> WeightDeltas:
        return WeightDeltas.from_layers(self.lm, {l: d.double() for l, d in delta.items()}, method)

    def set(self, version: str, delta: dict[int, torch.Tensor] | None) -> None:
        """Carry ``delta`` (cumulative, math layout) on top of the base weights, named ``version``."""
        if version == self.version:
            return
        self.reset()
        if delta:
            self._applied = self.weight_deltas(delta).apply(self.lm.model, check_base=False)
        self.version = version

    def reset(self) -> None:
        if self._applied is not None:
            self._applied.revert()
            self._applied = None
        self.version = "base"


@dataclass
class Prepared:
    """A client's edit of one round, measured on model state ``version``."""

    version: str
    used: list[int]  # indices (into the round's records) that entered the statistics
    vanished: list[int]  # kept by the server but already said by the model (residual ≈ 0)
    vectors: EditVectors | None
    seconds: float = 0.0  # spent computing this (0 when it came from the cache)
    targets: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.used)

    def stats(self) -> dict[int, LayerSums]:
        return layer_sums(self.vectors) if self.vectors is not None and len(self.vectors) else {}


class CollabClient:
    """A client with ``records[r]`` = its facts of round r (EvalRecords)."""

    def __init__(self, client_id: str, model: PublishedModel, hparams, resources, records: list[list], salt: bytes,
                 residual_tol: float = 1e-6, dataset: str = "counterfact"):
        if getattr(hparams, "form", "base") != "base":
            hparams = dataclasses.replace(hparams, form="base")
        if residual_tol < 0:
            raise CollabError(f"residual_tol must be ≥ 0, got {residual_tol}.", "use e.g. 1e-6.")
        self.id, self.model, self.hp, self.res = client_id, model, hparams, resources
        self.records, self.salt, self.tol, self.dataset = records, salt, residual_tol, dataset
        self.kept: dict[int, list[int]] = {}  # round -> indices applied (after vanishing)
        self._cache: dict[tuple, Prepared] = {}
        self._pre: dict[int, list[dict]] = {}  # round -> raw scores on the base model
        self.dp = None  # privacy.DPConfig: share clipped, noisy sums (None: the exact sums)
        self.noise_seed = b""  # this client's secret for its DP noise (never leaves it)

    def round_records(self, rnd: int) -> list:
        if not 0 <= rnd < len(self.records):
            raise CollabError(f"client {self.id} has no facts for round {rnd + 1} (it has {len(self.records)} rounds).",
                              "give every client one list of facts per round.")
        return self.records[rnd]

    def digests(self, rnd: int) -> list[FactDigest]:
        return digest_records(self.round_records(rnd), self.salt)

    def prepare(self, rnd: int, keep: list[int]) -> Prepared:
        """Edit vectors of the kept facts on the model as it is now (cached per model state)."""
        recs = self.round_records(rnd)
        bad = [i for i in keep if not 0 <= i < len(recs)]
        if bad:
            raise CollabError(f"the server asked client {self.id} to keep facts {bad} of round {rnd + 1}, "
                              f"which has {len(recs)}.", "send indices into the client's own list.")
        ck = (self.model.version, rnd, tuple(keep))
        if ck in self._cache:  # e.g. another merge method on the same model state: no new work
            return dataclasses.replace(self._cache[ck], seconds=0.0)
        t0 = time.perf_counter()
        vec, used, vanished, targets = None, [], [], []
        if keep:
            reqs = [recs[i].request for i in keep]
            vec, targets, _ = compute_vectors(self.model.lm, reqs, self.hp, self.res)
            check_finite(vec, f"client {self.id}'s edit vectors")
            for j, (i, t) in enumerate(zip(keep, targets)):
                t["index"] = i
                rel = t["delta_norm"] / max(t["h_norm"], 1e-30)
                (vanished if rel <= self.tol else used).append(i)
            if vanished:
                vec = vec.select([keep.index(i) for i in used]) if used else None
        out = Prepared(self.model.version, used, vanished, vec, time.perf_counter() - t0, targets)
        self._cache[ck] = out
        return out

    def shared_stats(self, rnd: int, p: Prepared) -> dict[int, LayerSums]:
        """What this client shares of ``p`` (round ``rnd``): its sums R Kᵀ, K Kᵀ, or with ``dp`` set
        the sums of clipped vectors plus Gaussian noise at every edited layer (``collab.privacy``)."""
        if self.dp is None:
            return p.stats()
        from fedit.collab.privacy import release

        if not self.noise_seed:
            raise CollabError(f"client {self.id} has no secret to seed its DP noise.", "set noise_seed (random bytes).")
        shapes = {l: self.model.lm.adapter.w_out_dims(l) for l in self.hp.layers}
        return release(p.vectors, list(self.hp.layers), shapes, self.dp, self.noise_seed,
                       f"{p.version}/{rnd}/{p.used}")

    def forget_cache(self) -> None:
        self._cache.clear()

    def cached(self, version: str, rnd: int, keep: list[int]) -> Prepared | None:
        """The edit of round ``rnd`` prepared on model state ``version``, if there is one."""
        return self._cache.get((version, rnd, tuple(keep)))

    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """What must survive between messages (an engine may serve each in a new process):
        the prepared edits (tensors) and the pre-edit scores (JSON-able)."""
        arrays: dict[str, torch.Tensor] = {}
        prepared = []
        for i, ((version, rnd, keep), p) in enumerate(self._cache.items()):
            if p.vectors is not None:
                arrays.update({f"p{i}.{k}": v for k, v in _vector_tensors(p.vectors).items()})
            prepared.append({"version": version, "round": rnd, "keep": list(keep), "used": p.used,
                             "vanished": p.vanished, "seconds": p.seconds, "targets": p.targets,
                             "vectors": p.vectors is not None,
                             "fingerprint": p.vectors.base_fingerprint if p.vectors is not None else ""})
        return arrays, {"prepared": prepared, "pre": {str(r): v for r, v in self._pre.items()}}

    def restore(self, arrays: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Take back what ``export`` returned."""
        self._pre = {int(r): [_int_keys(x) for x in v] for r, v in meta.get("pre", {}).items()}
        self._cache = {}
        for i, e in enumerate(meta.get("prepared", [])):
            vec = _vectors_from({k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith(f"p{i}.")},
                                e["fingerprint"]) if e["vectors"] else None
            self._cache[(e["version"], int(e["round"]), tuple(e["keep"]))] = Prepared(
                e["version"], list(e["used"]), list(e["vanished"]), vec, float(e["seconds"]), list(e["targets"]))

    def layer_stats(self, rnd: int, prepared: Prepared, step: int) -> LayerSums | None:
        """Layer-sequential form: this client's statistics at edited layer ``step`` on the model as
        it is (None without facts), with the targets z of ``prepared``."""
        from fedit.collab.layerwise import layer_stats

        if not prepared.n:
            return None
        recs = self.round_records(rnd)
        groups = self.res.templates(self.model.lm, self.hp.context_template_length_params)
        return layer_stats(self.model.lm, [recs[i].request for i in prepared.used], prepared.vectors.zs,
                           self.hp.layers, step, groups, self.hp.pullback_steps)

    @property
    def has_pre_scores(self) -> bool:
        return len(self._pre) == len(self.records)

    def accept(self, rnd: int, prepared: Prepared) -> None:
        """Remember which facts of round ``rnd`` are now on the model (for evaluation)."""
        self.kept[rnd] = list(prepared.used)

    def evaluate(self, upto: int) -> dict[int, dict[str, Any]]:
        """Metrics of the applied facts on the model as it is, per round of origin ≤ ``upto``.

        Returns {round: {"post": ``summed``, "pre": ``summed``}} (sums and counts, so that a
        server can pool clients exactly); "pre" is the same facts on the base model, measured
        by ``pre_scores``, which must run first, at the base.
        """
        out = {}
        for rnd in range(upto + 1):
            idx = self.kept.get(rnd, [])
            if not idx:
                continue
            recs = [self.round_records(rnd)[i] for i in idx]
            raw = measure(self.model.lm, recs)
            pre = self._pre_scores(rnd, idx)
            out[rnd] = {"post": summed([record_metrics(r, p, self.dataset) for r, p in zip(raw, pre)]),
                        "pre": summed([record_metrics(p, None, self.dataset) for p in pre])}
        return out

    def pre_scores(self) -> None:
        """Measure every fact on the model as it is (call once, at the base model)."""
        if self.model.version != "base":
            raise CollabError("pre-edit scores must be measured on the base model.", "reset the model state first.")
        for rnd, recs in enumerate(self.records):
            self._pre[rnd] = measure(self.model.lm, recs) if recs else []

    def _pre_scores(self, rnd: int, idx: list[int]) -> list[dict]:
        if rnd not in self._pre:
            raise CollabError(f"client {self.id} has no pre-edit scores.", "call pre_scores() on the base model first.")
        return [self._pre[rnd][i] for i in idx]


def _vector_tensors(v: EditVectors) -> dict[str, torch.Tensor]:
    return {"z": v.zs, **{f"key.{l}": k for l, k in v.keys.items()}, **{f"resid.{l}": r for l, r in v.resids.items()}}


def _vectors_from(t: dict[str, torch.Tensor], base: str) -> EditVectors:
    layers = sorted(int(k.split(".")[1]) for k in t if k.startswith("key."))
    return EditVectors(t["z"], {l: t[f"key.{l}"] for l in layers}, {l: t[f"resid.{l}"] for l in layers}, base)


def _int_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """A measurement after JSON: its probe indices are numbers again."""
    return {g: {int(i): s for i, s in probes.items()} for g, probes in raw.items()}


def summed(per: list[dict[str, float]]) -> dict[str, Any]:
    """Per-metric sums and counts of per-record metrics (what a client reports; ``pool`` undoes it)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for r in per:
        for k, v in r.items():
            sums[k] = sums.get(k, 0.0) + float(v)
            counts[k] = counts.get(k, 0) + 1
    return {"n": len(per), "sums": sums, "counts": counts}


def pool(parts: list[dict[str, Any]]) -> dict[str, float]:
    """Means over the records of several ``summed`` parts, with CounterFact's score and ``n``."""
    from fedit.evaluate.metrics import harmonic_mean

    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    n = 0
    for p in parts:
        n += int(p["n"])
        for k, v in p["sums"].items():
            sums[k] = sums.get(k, 0.0) + v
            counts[k] = counts.get(k, 0) + int(p["counts"][k])
    out: dict[str, float] = {k: sums[k] / counts[k] for k in sorted(sums) if counts[k]}
    if all(k in out for k in ("efficacy_success", "paraphrase_success", "neighborhood_success")):
        out["score"] = harmonic_mean([out["efficacy_success"], out["paraphrase_success"], out["neighborhood_success"]])
    out["n"] = n
    return out
