"""FedEdit with GRACE: clients share codebook entries (key → value, radius) through the MKV store.

A GRACE codebook at layer L is a set of entries, much like MKVs: a key (W_out's input, the MLP
activation at one position of an edit's prompt or target), a value (the output that replaces
W_out's there) and a deferral radius ε. One fact writes one entry per target token. FedEdit's
slots carry them as they carry MEMIT's MKVs (``docs/federation.md``, "GRACE"):

- **local edit**: a client writes its slot's facts into its codebook, one after another. A fact
  that the entries it already received answer (the value optimisation stops before its first
  step) is *covered*: its work was saved, and it is not uploaded again. Every other fact is
  uploaded as one row: the index vector (``z``: the value at the prompt's last token, the
  layer's wanted output there; ``delta``: that value minus the base model's output there) and
  a payload of the fact's entries (``grace.keys`` [m, d_in], ``grace.values`` [m, d_out],
  ``grace.radii`` [m], ``grace.n``: m; rows padded to the longest fact of a batch). Meta: the
  fact id, the base model's fingerprint, the layer. No request text and no labels (token ids).
- **retrieve**: the server applies FedEdit's hit rule to the index vectors, as for MKVs.
- **reuse**: a client checks the hit entries (:func:`check_entries`) and adds them to its
  codebook without optimising anything: an entry on the key of one it holds is the same input
  again and is left out (its own edit wins), one within reach of an entry it holds splits the
  distance with it (GRACE's rule for another label: received entries have no label).

Every client's model is base + its codebook, a :class:`~fedit.memory.MemoryEdit`; its saved
state is the codebook. Methods say how they federate in the registry (``Method.federates``);
:func:`check_method` refuses the others and :func:`client_class` / :func:`server_class` pick
the roles.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from fedit.core.hooks import capture
from fedit.core.tokens import encode
from fedit.deltas import AppliedEdit
from fedit.federation.fededit import MATCH, ClientReport, FedEditClient, FedEditServer, FedError, MKVBatch
from fedit.methods import Resources, get_method, names
from fedit.methods.grace import GraceState, distances

log = logging.getLogger(__name__)

KEYS, VALUES, RADII, COUNT = "grace.keys", "grace.values", "grace.radii", "grace.n"
# What a received entry may be, against the receiver's model (``Scale``) and hyperparameters:
KEY_FACTOR = 4.0  # key norm ≤ 4 × the largest W_out input norm on the reference text
VALUE_FACTOR = 10.0  # value norm ≤ 10 × the largest W_out output norm there
RADIUS_FACTOR = 4.0  # 0 < radius ≤ 4 × the receiver's own eps
REFERENCE = (4, 32)  # reference text: 4 chunks of 32 tokens of the statistics corpus


# --- which methods federate, and how --------------------------------------------------------
def federating() -> list[str]:
    """Methods that can take part in FedEdit (``Method.federates`` set)."""
    return sorted(set(names()) - set(names(federates="")))


def check_method(method: str, mode: str, baseline: str = "") -> None:
    """Refuse a method that cannot federate as asked (raises :class:`FedError` naming those that can)."""
    m = get_method(method)
    if not m.federates:
        raise FedError(f"{m.name} cannot take part in FedEdit: it has nothing per fact that another client could "
                       "reuse without the request (docs/families.md, Federation).",
                       f"use --method {' or '.join(federating())}.")
    if m.federates == "mkv" and mode == "private" and not m.private_mkvs:
        raise FedError(f"{m.name} cannot run in private mode: its update is not a plain solve of per-fact vectors.",
                       f"use --method {' or '.join(names(private_mkvs=True) + names(federates='codebook'))}, "
                       "or --mode paper --share-requests.")
    if m.federates == "codebook" and mode != "private":
        raise FedError(f"{m.name} shares codebook entries, which carry no request text: it runs in private mode only.",
                       "leave out --mode paper.")
    if m.federates == "codebook" and baseline:
        raise FedError(f"the {baseline} baseline averages weight changes; a {m.name} codebook is not one.",
                       "leave out --baseline.")


def client_class(method: str) -> type:
    """The client role for ``method``: :class:`CodebookClient` or :class:`FedEditClient`."""
    return CodebookClient if get_method(method).federates == "codebook" else FedEditClient


def server_class(method: str) -> type:
    """The server role for ``method``: :class:`CodebookServer` or :class:`FedEditServer`."""
    return CodebookServer if get_method(method).federates == "codebook" else FedEditServer


# --- entries as payloads ----------------------------------------------------------------------
def fact_payload(keys: torch.Tensor, values: torch.Tensor, radii: torch.Tensor) -> dict[str, torch.Tensor]:
    """One fact's m entries as a payload (keys [m, d_in], values [m, d_out], radii [m])."""
    return {KEYS: keys.float(), VALUES: values.float(), RADII: radii.float(), COUNT: torch.tensor(keys.shape[0])}


def pad_payloads(payloads: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """The payloads with their entry rows zero-padded to the longest (``grace.n`` keeps the count),
    so that a batch stacks into one tensor per name."""
    if not payloads:
        return []
    m = max(p[KEYS].shape[0] for p in payloads)

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros(m - t.shape[0], *t.shape[1:])]) if t.shape[0] < m else t

    return [{**p, KEYS: pad(p[KEYS]), VALUES: pad(p[VALUES]), RADII: pad(p[RADII])} for p in payloads]


@dataclass
class Scale:
    """The receiver's yardstick: W_out's inputs and outputs at layer L on a reference text."""

    keys: torch.Tensor  # [T, d_in] every reference position's key
    key_norm: float  # largest key norm
    value_norm: float  # largest output norm


def reference_scale(lm, layer: int, resources: Resources) -> Scale:
    """W_out's inputs and outputs at ``layer`` on the first chunks of the statistics corpus (base model)."""
    from fedit.corpus import open_corpus

    n, length = REFERENCE
    chunks = []
    for c in open_corpus(resources.corpus).chunks(lm.tokenizer, length):
        chunks.append(c)
        if len(chunks) == n:
            break
    ids = torch.tensor(chunks, device=lm.device)
    with torch.no_grad(), capture({"w": lm.adapter.w_out(layer)}, inputs=True) as got:
        lm.adapter.body()(input_ids=ids)
    k = got["w"]["input"].reshape(-1, got["w"]["input"].shape[-1]).float().cpu()  # [T, d_in]
    v = got["w"]["output"].reshape(-1, got["w"]["output"].shape[-1]).float().cpu()  # [T, d_out]
    return Scale(k, float(k.norm(dim=1).max()), float(v.norm(dim=1).max()))


def check_entries(hits: MKVBatch, dims: tuple[int, int], scale: Scale, eps: float, fingerprint: str,
                  layer: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Received facts' entries, unpadded: [(keys [m, d_in], values [m, d_out], radii [m])].

    Refuses (:class:`FedError`) a batch with a fact of another base model or layer, of the wrong
    shape, with NaN/Inf, a key or value far beyond the model's scale, a radius ≤ 0 or beyond
    ``RADIUS_FACTOR`` × ``eps``, or an entry whose ball holds a position of the reference text
    (it would change unrelated text)."""
    d_out, d_in = dims
    out = []
    for i, (p, meta) in enumerate(zip(hits.payloads, hits.meta)):
        fact = meta.get("fact", i)
        if meta.get("fingerprint") != fingerprint or meta.get("layer") != layer:
            raise FedError(f"received GRACE entries of fact {fact} are for base model {meta.get('fingerprint')}, "
                           f"layer {meta.get('layer')}; this client edits {fingerprint}, layer {layer}.",
                           "every client must use the same base model and GRACE layer.")
        if not {KEYS, VALUES, RADII, COUNT} <= set(p):
            raise FedError(f"received entries of fact {fact} lack {sorted({KEYS, VALUES, RADII, COUNT} - set(p))}.",
                           "run every client with the same --method grace.")
        k, v, r, n = p[KEYS], p[VALUES], p[RADII], p[COUNT]
        m = k.shape[0] if k.dim() == 2 else -1
        if (n.numel() != 1 or not 1 <= int(n) <= m or k.shape[1] != d_in or tuple(v.shape) != (m, d_out)
                or tuple(r.shape) != (m,)):
            raise FedError(f"received entries of fact {fact} have shapes keys {tuple(k.shape)}, values "
                           f"{tuple(v.shape)}, radii {tuple(r.shape)}, count {n.tolist()}; this model needs "
                           f"[m, {d_in}], [m, {d_out}], [m] and 1 ≤ count ≤ m.", "use the same base model and layer.")
        k, v, r = (t[: int(n)].float() for t in (k, v, r))
        _check_scale(fact, k, v, r, scale, eps)
        out.append((k, v, r))
    return out


def _check_scale(fact: Any, k: torch.Tensor, v: torch.Tensor, r: torch.Tensor, scale: Scale, eps: float) -> None:
    if not all(bool(torch.isfinite(t).all()) for t in (k, v, r)):
        raise FedError(f"received entries of fact {fact} hold NaN or Inf.", "the sender must recompute them.")
    kn, vn = float(k.norm(dim=1).max()), float(v.norm(dim=1).max())
    if kn > KEY_FACTOR * scale.key_norm or vn > VALUE_FACTOR * scale.value_norm:
        raise FedError(f"received entries of fact {fact} have key norm {kn:.3g} / value norm {vn:.3g}, beyond "
                       f"{KEY_FACTOR:g} × {scale.key_norm:.3g} / {VALUE_FACTOR:g} × {scale.value_norm:.3g} (this "
                       "model's largest on its reference text).", "refuse this client's entries; ask it to recompute.")
    if bool((r <= 0).any()) or float(r.max()) > RADIUS_FACTOR * eps:
        raise FedError(f"received entries of fact {fact} have radii {[round(x, 4) for x in r.tolist()]}; they must "
                       f"lie in (0, {RADIUS_FACTOR:g} × eps = {RADIUS_FACTOR * eps:g}].",
                       "use the same eps on every client; refuse entries that would cover everything.")
    near = distances(scale.keys, k).min(0).values  # [m] distance of each key to the nearest reference position
    if bool((near <= r).any()):
        raise FedError(f"a received entry of fact {fact} covers a position of unrelated reference text (distance "
                       f"{float(near.min()):.3g} within its radius): it would change what the model says there.",
                       "refuse this client's entries.")


# --- merging received entries -------------------------------------------------------------------
def merge_entries(book: dict[str, torch.Tensor], k: torch.Tensor, v: torch.Tensor, r: torch.Tensor,
                  same: float) -> int:
    """Add received entries to ``book`` (keys, values, radii, labels; changed in place); returns how
    many were added. An entry within ``same`` of a held key is the same input again and is left
    out; one within reach of the nearest held entry splits the distance with it (both radii at
    most d/2), as GRACE does for entries of different labels. Received entries get labels < 0,
    unique, so no later edit takes one for its own label."""
    added = 0
    for key, val, rad in zip(k, v, r):
        rad = float(rad)
        if book["keys"].shape[0]:
            dist, j = distances(key[None], book["keys"])[0].min(0)
            d, j = float(dist), int(j)
            if d <= same:
                continue
            if d <= rad + float(book["radii"][j]):
                book["radii"][j] = min(float(book["radii"][j]), d / 2)
                rad = min(rad, d / 2)
        label = -1 - int(book["labels"].shape[0])
        book["keys"] = torch.cat([book["keys"], key[None]])
        book["values"] = torch.cat([book["values"], val[None]])
        book["radii"] = torch.cat([book["radii"], torch.tensor([rad])])
        book["labels"] = torch.cat([book["labels"], torch.tensor([label])])
        added += 1
    return added


@dataclass
class CodebookReport(ClientReport):
    covered: int = 0  # own facts the received entries already answered: no value optimised
    covered_seconds: float = 0.0  # time those facts took (a check, no optimisation)


class CodebookClient:
    """One organisation's side of FedEdit with GRACE, on its own copy of the shared base model.

    The same calls as :class:`FedEditClient` (``local_edit``, ``reuse``, ``state``/``load_state``,
    ``to_base``, ``applied``, ``report``); the model holds base + this client's codebook."""

    def __init__(self, client_id: str, lm, hparams, resources: Resources | None = None, mode: str = "private",
                 share_requests: bool = False, match: str = "z", method: str = "grace"):
        check_method(method, mode)
        if match not in MATCH:
            raise FedError(f"unknown match vector {match!r}.", f"use one of {MATCH}.")
        self.id, self.lm, self.hp, self.match, self.mode = client_id, lm, hparams, match, mode
        self.res = resources or Resources()
        self.method = get_method(method)
        (self.layer,) = hparams.layers
        self.report = CodebookReport(client_id)
        self.fingerprint = lm.identity()["fingerprint"]
        self.book: dict[str, torch.Tensor] | None = None  # keys, values, radii, labels (received: < 0)
        self.fact_ids: list[str] = []  # facts whose entries are in the codebook, own and received
        self.applied: list[AppliedEdit] = []
        self._scale: Scale | None = None

    # --- the model's state ------------------------------------------------------------
    def _state(self) -> GraceState | None:
        if self.book is None:
            return None
        return GraceState(*({self.layer: self.book[k]} for k in ("keys", "values", "radii", "labels")))

    def to_base(self) -> None:
        for a in reversed(self.applied):
            a.revert()
        self.applied = []

    def _apply(self) -> None:
        self.to_base()
        if self.book is not None and self.book["keys"].shape[0]:
            self.applied = [self._state().memory_edit(self.lm).apply(self.lm.model)]

    def state(self) -> dict[str, Any]:
        """What must survive between calls: the codebook, the facts held, the report."""
        arrays = {f"cb.{k}": t for k, t in self.book.items()} if self.book is not None else {}
        return {"arrays": arrays, "fact_ids": list(self.fact_ids), "report": self.report.to_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.to_base()
        arrays = state.get("arrays", {})
        self.fact_ids = list(state.get("fact_ids", []))
        if "report" in state:
            self.report = CodebookReport(**state["report"])
        if "cb.keys" in arrays:
            self.book = {k: arrays[f"cb.{k}"] for k in ("keys", "values", "radii", "labels")}
            self.book["labels"] = self.book["labels"].long()
        self._apply()

    def _empty(self) -> dict[str, torch.Tensor]:
        d_out, d_in = self.lm.adapter.w_out_dims(self.layer)
        return {"keys": torch.zeros(0, d_in), "values": torch.zeros(0, d_out), "radii": torch.zeros(0),
                "labels": torch.zeros(0, dtype=torch.long)}

    # --- the FedEdit steps --------------------------------------------------------------
    def local_edit(self, slot: int, requests: list, fact_ids: list[str]) -> MKVBatch:
        """Write this slot's own requests into the codebook; return the entries of the facts it
        computed (not those the received entries already answered) for upload."""
        t0 = time.perf_counter()
        if len(fact_ids) != len(requests):
            raise FedError(f"{len(requests)} requests but {len(fact_ids)} fact ids.", "give one id per request.")
        if not requests:
            return MKVBatch.empty(self.lm.adapter.w_out_dims(self.layer)[0])
        self.to_base()  # keys, warm values and h are measured on the base model
        computed, covered, seconds = [], 0, 0.0
        state = self._state() or GraceState(*({self.layer: t} for t in self._empty().values()))
        for r, f in zip(requests, fact_ids):
            received = (state.labels[self.layer] < 0).tolist()
            out = self.method.run(self.lm, [r], self.hp, self.res, state=state)
            state, (t,) = out.state, out.targets
            if t["steps"] == 0 and any(i < len(received) and received[i] for i in t["entries"]):
                covered += 1
                self.report.covered_seconds += out.seconds
            else:
                computed.append((r, f, t["entries"]))
                seconds += out.seconds
        self.book = {k: getattr(state, k)[self.layer] for k in ("keys", "values", "radii", "labels")}
        batch = self._batch(computed)
        self.fact_ids += list(fact_ids)
        self._apply()
        rep = self.report
        rep.own_facts += len(requests)
        rep.covered += covered
        rep.mkvs_computed += len(computed)
        rep.mkv_seconds += seconds
        rep.edit_seconds += time.perf_counter() - t0
        rep.slots.append({"slot": slot, "own": len(requests), "covered": covered,
                          "seconds": round(time.perf_counter() - t0, 3)})
        return batch

    def _batch(self, computed: list) -> MKVBatch:
        """The computed facts' entries as one upload (the model is at its base weights)."""
        d_out = self.lm.adapter.w_out_dims(self.layer)[0]
        if not computed:
            return MKVBatch.empty(d_out)
        b = self.book
        payloads = [fact_payload(b["keys"][u], b["values"][u], b["radii"][u]) for _, _, u in computed]
        index = []
        for r, _, u in computed:  # the value the prompt's last token gets (minus the base output there: delta)
            key, out = _prompt_last(self.lm, r, self.layer)
            j = u[int(distances(key[None], b["keys"][u])[0].argmin())]
            index.append(b["values"][j] - (out if self.match == "delta" else 0))
        index = torch.stack(index).float()  # [n, d_out]
        meta = [{"fact": f, "fingerprint": self.fingerprint, "layer": self.layer} for _, f, _ in computed]
        return MKVBatch(index, pad_payloads(payloads), meta, owner=self.id)

    def reuse(self, slot: int, hits: MKVBatch) -> dict[str, Any]:
        """Add other clients' entries to the codebook (nothing is optimised: the saved work)."""
        t0 = time.perf_counter()
        n = len(hits)
        info = {"slot": slot, "hits": n, "applied": 0, "unusable": 0, "held": 0}
        if n:
            self.to_base()
            if self._scale is None:
                self._scale = reference_scale(self.lm, self.layer, self.res)
            facts = check_entries(hits, self.lm.adapter.w_out_dims(self.layer), self._scale, self.hp.eps,
                                  self.fingerprint, self.layer)
            self.book = self.book if self.book is not None else self._empty()
            for (k, v, r), meta in zip(facts, hits.meta):
                if merge_entries(self.book, k, v, r, same=1e-3 * self.hp.eps):
                    info["applied"] += 1
                    self.fact_ids.append(str(meta.get("fact")))
                else:
                    info["held"] += 1  # every entry already held: the same fact, edited here too
            self._apply()
            log.info("client %s, slot %d: took %d facts' entries, %d already held", self.id, slot, info["applied"],
                     info["held"])
        self.report.add_reuse(info, time.perf_counter() - t0)
        return info


def _prompt_last(lm, request, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W_out's input [d_in] and output [d_out] at ``layer`` at the prompt's last token (model as it is)."""
    ids = torch.tensor([encode(lm.tokenizer, request.filled_prompt)], device=lm.device)
    with torch.no_grad(), capture({"w": lm.adapter.w_out(layer)}, inputs=True) as got:
        lm.adapter.body()(input_ids=ids)
    return got["w"]["input"][0, -1].float().cpu(), got["w"]["output"][0, -1].float().cpu()


class CodebookServer(FedEditServer):
    """FedEdit's server for codebook entries: the same store and hit rule; the hits' entry rows
    are padded to one length so that they travel as one batch."""

    padded = True  # each upload pads its facts' entry rows to its own longest

    def hits_for(self, client_id: str, slot: int) -> tuple[MKVBatch, list[dict]]:
        batch, info = super().hits_for(client_id, slot)
        return dataclasses.replace(batch, payloads=pad_payloads(batch.payloads)), info
