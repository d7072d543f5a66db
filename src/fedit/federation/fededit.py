"""FedEdit (FLEKE): the client and server roles, free of any federation engine.

A client edits its own requests slot by slot, uploads one mediator knowledge vector (MKV, the
target z of MEMIT) per fact, and re-edits with the other clients' MKVs the server finds
similar to its own. Two payload modes:

``private`` (default)
    An MKV carries z plus, per edited layer, the key k_l and the W_out-space residual r_l that
    the owner's MEMIT run on the shared base model used (layer by layer by default, so the
    owner's own edit is exactly the solve of its vectors; ``form="base"``: all measured on the
    unedited model, ``methods.vectors``). A receiver adds them to its sufficient statistics and
    solves; no request text leaves a client. What it reveals:
    the subject's representation at the edited layers (keys) and the direction of the edit
    (z, r) — enough for a holder of the base model to probe which of a list of candidate
    facts were edited, not the text itself. Every client's model is base + one MEMIT solve
    (base-model form) over all facts it holds, own and reused.
``paper``
    As the reference code: an MKV is z alone; the plaintext request travels beside it only
    when its owner opted in (``share_requests``). Each client edits its own model layer by
    layer (MEMIT as published); a receiver re-edits with the request and the given z. Without
    the opt-in, reused MKVs cannot be applied and are counted as unusable.

The FedAvg baseline (``fedavg_update``/``average_updates``) averages the clients' MEMIT
deltas, all computed from the same global model: the plain mean of Δ, not the reference
code's separately averaged factors.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from fedit.core import activations
from fedit.deltas import AppliedEdit, WeightDeltas
from fedit.errors import FeditError
from fedit.federation.guard import DEFAULT_NORM_FACTOR, Guard, Rejection, measure_scale
from fedit.methods import Resources, get_method, names
from fedit.methods.vectors import (
    EditVectors,
    VectorError,
    check_finite,
    compute_vectors,
    deltas_from_sums,
    layer_sums,
)
from fedit.requests import EditRequest

log = logging.getLogger(__name__)

MODES = ("private", "paper")
# What the server compares: "z" (the MKV itself, as the paper) or "delta" (z − h, the edit's
# direction: on models whose residual stream has a dominant direction, all z look alike).
MATCH = ("z", "delta")


class FedError(FeditError):
    """A federated run that cannot go on as asked."""


@dataclass
class MKVBatch:
    """The MKVs of one client and slot: rows of ``vectors`` are facts."""

    vectors: torch.Tensor  # [n, d_model] z
    payloads: list[dict[str, torch.Tensor]]  # per fact: key.<l>, resid.<l> (private) or {} (paper)
    meta: list[dict[str, Any]]  # per fact: {"fact": id, "fingerprint": base model's, ["request": {...}]}
    owner: str = ""

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def to_arrays(self) -> dict[str, torch.Tensor]:
        """Batched tensors (one row per fact), e.g. for a Flower ArrayRecord: ``mkv`` is the vector
        the server indexes, the rest the payload (``z`` among it when the index is δ)."""
        out = {"mkv": self.vectors.contiguous()}
        if self.payloads and self.payloads[0]:
            for name in self.payloads[0]:
                out[name] = torch.stack([p[name] for p in self.payloads]).contiguous()
        return out

    @staticmethod
    def from_arrays(arrays: dict[str, torch.Tensor], meta: list[dict], owner: str = "") -> "MKVBatch":
        if "mkv" not in arrays:
            raise FedError(f"an MKV payload has no 'mkv' vectors (it has {sorted(arrays)}).",
                           "send one MKV per fact under 'mkv'.")
        z = arrays["mkv"]
        n = z.shape[0] if z.dim() == 2 else -1
        if n < 0 or len(meta) != n or any(t.shape[0] != n for t in arrays.values()):
            raise FedError(f"an MKV payload of {len(meta)} facts has tensors of shapes "
                           f"{ {k: tuple(v.shape) for k, v in arrays.items()} }.",
                           "send one row per fact in every tensor and one meta entry per fact.")
        rest = {k: v for k, v in arrays.items() if k != "mkv"}
        return MKVBatch(z, [{k: v[i] for k, v in rest.items()} for i in range(n)], list(meta), owner)

    @staticmethod
    def empty(d: int) -> "MKVBatch":
        return MKVBatch(torch.zeros(0, d), [], [])

    def select(self, idx: list[int]) -> "MKVBatch":
        """The facts ``idx`` of this batch, in that order."""
        if not idx:
            return MKVBatch(self.vectors[:0], [], [], self.owner)
        return MKVBatch(self.vectors[idx], [self.payloads[i] for i in idx], [self.meta[i] for i in idx], self.owner)


@dataclass
class ClientReport:
    client: str
    own_facts: int = 0
    mkvs_computed: int = 0
    mkv_seconds: float = 0.0  # time spent optimising own z
    reused: int = 0  # other clients' MKVs applied
    rejected: int = 0  # received MKVs refused by the guard (shape, norm, base model)
    unusable: int = 0  # hits that could not be applied (paper mode without the owner's opt-in)
    reedit_seconds: float = 0.0
    edit_seconds: float = 0.0
    slots: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def add_reuse(self, info: dict[str, Any], seconds: float) -> None:
        """Count one slot's reuse (``info``: slot, applied, unusable; its seconds are set here)."""
        self.reused += info["applied"]
        self.unusable += info.get("unusable", 0)
        self.reedit_seconds += seconds
        info["seconds"] = round(seconds, 3)
        for s in self.slots:
            if s["slot"] == info["slot"]:
                s.update(reused=info["applied"], reuse_seconds=info["seconds"])


class FedEditClient:
    """One organisation's side of FedEdit, on its own copy of the shared base model."""

    def __init__(self, client_id: str, lm, hparams, resources: Resources | None = None, mode: str = "private",
                 share_requests: bool = False, match: str = "z", method: str = "memit",
                 norm_factor: float = DEFAULT_NORM_FACTOR):
        """``lm`` must be at its base weights: the client measures its scale and recomputes the base
        model's fingerprint from them (``guard.measure_scale``), never trusting a stated one."""
        if mode not in MODES:
            raise FedError(f"unknown payload mode {mode!r}.", f"use one of {MODES}.")
        self.id, self.lm, self.hp, self.mode = client_id, lm, hparams, mode
        self.res = resources or Resources()
        self.share_requests = share_requests
        self.method = get_method(method)
        if mode == "private" and not self.method.private_mkvs:
            raise FedError(f"{self.method.name} cannot run in private mode: its update is not a plain solve of "
                           "per-fact vectors, so other clients could not rebuild it.",
                           f"use one of {tuple(names(private_mkvs=True))}, or --mode paper --share-requests.")
        if match not in MATCH:
            raise FedError(f"unknown match vector {match!r}.", f"use one of {MATCH}.")
        self.match = match
        self.report = ClientReport(client_id)
        if not norm_factor > 0:
            raise FedError(f"the norm factor must be > 0, got {norm_factor}.", "use e.g. the default, 20.")
        self.guard = Guard(measure_scale(lm, list(hparams.layers)), norm_factor)
        self.fingerprint = self.guard.scale.fingerprint  # of the shared base model, from this client's weights
        self.vectors: EditVectors | None = None  # private: every fact held (own and reused)
        self.fact_ids: list[str] = []  # private: row ids of self.vectors; paper: facts applied
        self.applied: list[AppliedEdit] = []  # edits now on the model
        # paper mode, stateful method (AlphaEdit): the keys of every edit now on the model, so that
        # each slot's edit is projected away from the ones of earlier slots
        self.method_state = None

    # --- the model's state ------------------------------------------------------------
    def to_base(self) -> None:
        for a in reversed(self.applied):
            a.revert()
        self.applied = []
        self.method_state = None

    def _edit_in_place(self, requests: list[EditRequest], zs: torch.Tensor | None = None):
        """Paper mode: compute the method's edit on the model as it is now and apply it."""
        out = self.method.run(self.lm, requests, self.hp, self.res, zs=zs, state=self.method_state)
        out.deltas.with_originals(self.lm.model)
        self.applied.append(out.deltas.apply(self.lm.model, check_base=False))
        if self.method.stateful:
            self.method_state = out.state
        return out

    def _solve_and_apply(self) -> None:
        self.to_base()
        if self.vectors is None or not len(self.vectors):
            return
        wd = deltas_from_sums(self.lm, layer_sums(self.vectors), self.hp, self.res, method="memit")
        self.applied = [wd.apply(self.lm.model, check_base=False)]

    def current_deltas(self) -> dict[str, torch.Tensor]:
        """This client's total weight change against the base model."""
        out: dict[str, torch.Tensor] = {}
        for a in self.applied:
            for n, d in a.deltas.deltas.items():
                out[n] = out.get(n, 0) + d.float()
        return out

    def state(self) -> dict[str, Any]:
        """What must survive between calls (engines may run every call in a new process)."""
        arrays: dict[str, torch.Tensor] = {}
        if self.mode == "private" and self.vectors is not None:
            arrays = {"v.z": self.vectors.zs, **{f"v.key.{l}": k for l, k in self.vectors.keys.items()},
                 **{f"v.resid.{l}": r for l, r in self.vectors.resids.items()}}
        elif self.mode == "paper":
            arrays = {f"d.{n}": d for n, d in self.current_deltas().items()}
        extra = {}
        if self.method_state is not None:  # AlphaEdit: Σ K Kᵀ of the edits on the model
            arrays.update({f"s.kk.{l}": t for l, t in self.method_state.kk.items()})
            extra["method_state_edits"] = self.method_state.edits
        return {"arrays": arrays, "fact_ids": list(self.fact_ids), "report": self.report.to_dict(), **extra}

    def load_state(self, state: dict[str, Any]) -> None:
        self.to_base()
        arrays = state.get("arrays", {})
        self.fact_ids = list(state.get("fact_ids", []))
        if "report" in state:
            self.report = ClientReport(**state["report"])
        if self.mode == "private" and "v.z" in arrays:
            layers = sorted(int(k.rsplit(".", 1)[1]) for k in arrays if k.startswith("v.key."))
            self.vectors = EditVectors(arrays["v.z"], {l: arrays[f"v.key.{l}"] for l in layers},
                                       {l: arrays[f"v.resid.{l}"] for l in layers}, self.fingerprint)
            self._solve_and_apply()
        elif self.mode == "paper":
            deltas = {k[2:]: v for k, v in arrays.items() if k.startswith("d.")}
            if deltas:
                wd = WeightDeltas(deltas=deltas, method=self.method.name, model=self.lm.identity())
                self.applied = [wd.apply(self.lm.model, check_base=False)]
            kk = {int(k.rsplit(".", 1)[1]): v for k, v in arrays.items() if k.startswith("s.kk.")}
            if kk and self.method.stateful:
                from fedit.methods.alphaedit import AlphaEditState

                self.method_state = AlphaEditState(kk=kk, edits=int(state.get("method_state_edits", 0)),
                                                   fingerprint=self.fingerprint)

    def _h(self, requests: list[EditRequest]) -> torch.Tensor:
        L = self.hp.layers[-1]
        name = f"{self.lm.adapter.block_name(L)}:output"
        return activations.at_subject(self.lm, requests, ["{}"], {"h": name})["h"][:, 0].float().cpu()

    # --- the FedEdit steps --------------------------------------------------------------
    def local_edit(self, slot: int, requests: list[EditRequest], fact_ids: list[str]) -> MKVBatch:
        """Edit this slot's own requests; return their MKVs for upload."""
        t0 = time.perf_counter()
        if len(fact_ids) != len(requests):
            raise FedError(f"{len(requests)} requests but {len(fact_ids)} fact ids.", "give one id per request.")
        if not requests:
            return MKVBatch.empty(self.lm.adapter.d_model)
        if self.mode == "private":
            self.to_base()  # MKVs are measured on the shared base model
        h = self._h(requests) if self.match == "delta" else None  # on the model the z are measured on
        if self.mode == "private":
            if getattr(self.hp, "form", None) == "base":  # base-form hparams: the vectors are the edit
                vec, reports, t_target = compute_vectors(self.lm, requests, self.hp, self.res)
            else:  # the method on the base model; its updates are the stats solve of these vectors
                out = self.method.run(self.lm, requests, self.hp, self.res)
                vec, t_target = out.diagnostics["vectors"], out.target_seconds
            check_finite(vec, "this client's edit vectors")
            vec.base_fingerprint = self.fingerprint
            self.vectors = vec if self.vectors is None else EditVectors.cat([self.vectors, vec])
            self.fact_ids += list(fact_ids)
            self._solve_and_apply()
            payloads = [{k: v for k, v in vec.fact_tensors(i).items() if k != "z"} for i in range(len(vec))]
            meta = [{"fact": f, "fingerprint": self.fingerprint} for f in fact_ids]
            zs = vec.zs
        else:
            out = self._edit_in_place(requests)
            t_target = out.target_seconds
            diag = out.diagnostics
            zs = (diag["vectors"].zs if "vectors" in diag else diag["zs"]).float().cpu()
            self.fact_ids += list(fact_ids)
            payloads = [{} for _ in requests]
            meta = [{"fact": f, "fingerprint": self.fingerprint,
                     **({"request": q.to_dict()} if self.share_requests else {})}
                    for f, q in zip(fact_ids, requests)]
        r = self.report
        r.own_facts += len(requests)
        r.mkvs_computed += len(requests)
        r.mkv_seconds += t_target
        r.edit_seconds += time.perf_counter() - t0
        r.slots.append({"slot": slot, "own": len(requests), "seconds": round(time.perf_counter() - t0, 3)})
        zs = zs.float().cpu()
        if h is not None:  # index the edit's direction; z travels in the payload
            for p, z in zip(payloads, zs):
                p["z"] = z
            return MKVBatch(zs - h, payloads, meta, owner=self.id)
        return MKVBatch(zs, payloads, meta, owner=self.id)

    def screen(self, hits: MKVBatch) -> tuple[list[int], list[Rejection]]:
        """Which received MKVs this client's guard accepts (their indices), and why it refuses the others
        (shape, norm bound, base model: ``guard``). A refusal is logged here and never raises."""
        keep, refused = [], []
        for i in range(len(hits)):
            meta = hits.meta[i] if isinstance(hits.meta[i], dict) else {}
            why = self.guard.check(hits.vectors[i], hits.payloads[i], meta, self.mode, self.match)
            if why is None:
                keep.append(i)
                continue
            mkv = meta.get("mkv")
            refused.append(Rejection(str(meta.get("from", hits.owner)), _fact_of(meta), why, by=self.id,
                                     mkv=mkv if isinstance(mkv, int) else None))
            log.warning("client %s refused a received MKV (store id %s, fact %s): %s", self.id, mkv,
                        refused[-1].fact, why)
        return keep, refused

    def reuse(self, slot: int, hits: MKVBatch) -> dict[str, Any]:
        """Re-edit with other clients' MKVs (no z is optimised here: the saved computation).

        Every MKV passes the guard first; a refused one is left out (``info["rejected"]`` says why)
        and the others are applied."""
        t0 = time.perf_counter()
        n = len(hits)
        keep, refused = self.screen(hits)
        info = {"slot": slot, "hits": n, "applied": 0, "unusable": 0, "rejected": [r.to_dict() for r in refused]}
        good = hits.select(keep)
        if len(good) and self.mode == "private":
            info["applied"] = self._reuse_vectors(good)
        elif len(good):
            info["applied"], info["unusable"] = self._reuse_requests(good)
        self.report.rejected += len(refused)
        self.report.add_reuse(info, time.perf_counter() - t0)
        return info

    def _reuse_vectors(self, hits: MKVBatch) -> int:
        """Private mode: add the hits' vectors (already checked by the guard) and solve again."""
        n = len(hits)
        try:
            vec = EditVectors.from_fact_tensors(
                [{"z": hits.vectors[i], **hits.payloads[i]} for i in range(n)], base_fingerprint=self.fingerprint)  # payload z wins
            check_finite(vec, "reused MKVs")
        except VectorError as e:
            raise FedError(f"reused MKVs do not carry what private mode needs: {e.problem}",
                           "run every client in the same --mode (private MKVs carry keys and residuals).") from e
        self.vectors = vec if self.vectors is None else EditVectors.cat([self.vectors, vec])
        self.fact_ids += [str(m.get("fact")) for m in hits.meta]
        self._solve_and_apply()
        return n

    def _reuse_requests(self, hits: MKVBatch) -> tuple[int, int]:
        """Paper mode: re-edit with the hits' requests and z; hits without a request are unusable."""
        usable = [i for i, m in enumerate(hits.meta) if "request" in m]
        if usable:
            reqs = [EditRequest.from_dict(hits.meta[i]["request"]) for i in usable]
            zs = torch.stack([hits.payloads[i].get("z", hits.vectors[i]) for i in usable]).float()
            self._edit_in_place(reqs, zs=zs)
            self.fact_ids += [str(hits.meta[i].get("fact")) for i in usable]
        return len(usable), len(hits) - len(usable)


class FedEditServer:
    """Stores MKVs and answers retrievals with the FedEdit rule.

    The server holds no model, so it checks only what it can without one before storing: every
    value finite, and every MKV of the layout (vector size, payload tensors and shapes) that most
    clients sent in the first slot with uploads. The receivers check the rest against their own
    model (``guard``). An MKV refused here is not stored; the others are, and ``refused``
    keeps every refusal (sender, fact token, reason)."""

    padded = False  # payload rows padded per upload (codebook entries): their count is not layout

    def __init__(self, store, tau: float = 0.4):
        if not -1.0 <= tau <= 1.0:
            raise FedError(f"tau must lie in [-1, 1] (a cosine), got {tau}.", "use e.g. 0.4 (the paper's value).")
        self.store, self.tau = store, tau
        self.layout: tuple | None = None  # (dim, ((name, shape), ...)) fixed by the first slot with uploads
        self.refused: list[Rejection] = []

    def register(self, client_id: str) -> None:
        if client_id not in self.store.clients():
            self.store.register_client(client_id)

    def receive(self, client_id: str, slot: int, batch: MKVBatch | str) -> list[int]:
        """Store what passes the server's checks of one client's upload; the ids stored. ``batch`` may
        be the reason an upload could not be read at all (then all of it is refused)."""
        if isinstance(batch, str):
            self.refused.append(Rejection(client_id, "", f"its upload cannot be read: {batch}", by="server"))
            return []
        if not len(batch):
            return []
        if self.layout is None:
            self.layout = _row_layout(batch, 0, self.padded)
        keep = []
        for i in range(len(batch)):
            why = _server_check(batch, i, self.layout, self.padded)
            if why:
                self.refused.append(Rejection(client_id, _fact_of(batch.meta[i]), why, by="server"))
            else:
                keep.append(i)
        good = batch.select(keep)
        try:
            return self.store.add(client_id, slot, good.vectors, good.payloads, good.meta) if keep else []
        except FeditError as e:  # a StoreError: nothing of this upload was stored
            self.refused += [Rejection(client_id, _fact_of(m), e.problem, by="server") for m in good.meta]
            return []

    def receive_slot(self, slot: int, batches: dict[str, MKVBatch | str]) -> tuple[dict[str, int], list[dict]]:
        """Every client's upload of ``slot``: how many MKVs of each were stored, and the refusals. The
        run's layout is the one most uploads share (first slot with uploads), so that no single
        client can fix it by answering first."""
        if self.layout is None:
            seen = Counter(_row_layout(b, 0, self.padded) for b in batches.values() if isinstance(b, MKVBatch) and len(b))
            self.layout = seen.most_common(1)[0][0] if seen else None
        before = len(self.refused)
        stored = {c: len(self.receive(c, slot, b)) for c, b in batches.items()}
        return stored, [r.to_dict() for r in self.refused[before:]]

    def hits_for(self, client_id: str, slot: int) -> tuple[MKVBatch, list[dict]]:
        """Other clients' MKVs of ``slot`` that are hits for ``client_id``'s own MKVs of that slot.

        Each hit's meta carries its store id (``mkv``), not its owner: receivers do not learn who sent
        what; :meth:`senders` names the owners of the MKVs a receiver refused."""
        own = self.store.for_slot(slot, owner=client_id)
        if not own:
            return MKVBatch.empty(self.store.dim or 0), []
        own_v = torch.stack([m.vector for m in own])
        hits = self.store.retrieve_fededit(client_id, slot, own_v, tau=self.tau)
        if not hits:
            return MKVBatch.empty(own_v.shape[1]), []
        batch = MKVBatch(torch.stack([h.mkv.vector for h in hits]), [h.mkv.payload for h in hits],
                         [{**h.mkv.meta, "mkv": h.mkv.id} for h in hits])
        info = [{"id": h.mkv.id, "owner": h.mkv.owner, "count": h.count, "max_sim": round(float(h.max_sim), 4)}
                for h in hits]
        return batch, info

    @staticmethod
    def senders(refused: list[dict], receiver: str, hits_info: list[dict]) -> list[dict]:
        """A receiver's refusals (``reuse``'s ``rejected``) with each sender named from the server's
        own record of who uploaded which MKV (``hits_for``'s info), never from the message."""
        owner = {i["id"]: i["owner"] for i in hits_info}
        return [{**r, "from": owner.get(r.get("mkv"), "?"), "by": receiver} for r in refused if isinstance(r, dict)]


def _fact_of(meta: Any) -> str:
    """The fact token an MKV's meta states (shortened; '' when there is none)."""
    return str(meta.get("fact", ""))[:64] if isinstance(meta, dict) else ""


def _row_layout(batch: MKVBatch, i: int, padded: bool = False) -> tuple:
    """MKV ``i``'s vector size and payload tensor shapes (``padded``: without the first dimension,
    a count of rows each upload pads to its own longest)."""
    p = batch.payloads[i] if i < len(batch.payloads) and isinstance(batch.payloads[i], dict) else {}
    return (int(batch.vectors.shape[-1]), tuple(sorted((k, tuple(v.shape[1:] if padded else v.shape))
                                                       for k, v in p.items() if isinstance(v, torch.Tensor))))


def _server_check(batch: MKVBatch, i: int, layout: tuple, padded: bool = False) -> str | None:
    """Why the server does not store MKV ``i`` of ``batch`` (None: it does)."""
    got = _row_layout(batch, i, padded)
    if got != layout:
        return f"its layout (size, tensors) {got} differs from the run's {layout}"
    for name, t in [("mkv", batch.vectors[i]), *sorted(batch.payloads[i].items())]:
        if t.is_floating_point() and not torch.isfinite(t).all():
            return f"{name} holds NaN or Inf"
    return None


# --- FedAvg baseline ---------------------------------------------------------------------
def fedavg_update(lm, hp, res: Resources, requests: list[EditRequest],
                  method: str = "memit") -> tuple[dict[str, torch.Tensor], float]:
    """One client's update (MEMIT by default) computed on ``lm`` as it is (the current global model)."""
    if not requests:
        return {}, 0.0
    out = get_method(method).run(lm, requests, hp, res)
    return {n: d.float() for n, d in out.deltas.deltas.items()}, out.target_seconds


def average_updates(updates: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Plain mean of the clients' Δ (a client without an update counts as Δ = 0)."""
    updates = list(updates)
    if not updates:
        return {}
    names = sorted({n for u in updates for n in u})
    out = {}
    for n in names:
        parts = [u[n].float() for u in updates if n in u]
        out[n] = torch.stack(parts).sum(0) / len(updates)
    return out

