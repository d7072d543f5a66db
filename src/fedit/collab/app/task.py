"""CollabEdit's work on one node, free of Flower: the model a process holds, the node's client
(restored from what it saved after its last message), and the answers to the server's questions.

A process loads the model once and serves every node it hosts (all nodes see the same published
model); a node's own work (its pre-edit scores, its prepared edits) travels in the state the
engine keeps per node, so a deployment may serve every message in a new process.
"""

from __future__ import annotations

from typing import Any

import torch

from fedit.collab.client import CollabClient, CollabError, PublishedModel
from fedit.collab.config import for_form
from fedit.collab.merge import solve
from fedit.collab.secure import encode, exponents
from fedit.collab.settings import CollabSettings, client_facts

_HELD: dict[tuple, dict[str, Any]] = {}  # per process: model, its published state, hparams, resources


def settings_for(run_config: dict[str, Any], given: CollabSettings | None) -> CollabSettings:
    """The run's settings: those the app was made with, else the run config (deployment)."""
    return given if given is not None else CollabSettings.from_user_config(dict(run_config))


def held(s: CollabSettings, lm=None) -> dict[str, Any]:
    """This process's model for the run (loaded once): {"lm", "model" (PublishedModel), "hp", "res"}."""
    key = (s.model, s.device, s.dtype, s.cache_dir, s.corpus, s.overrides, s.hparams_file)
    if key not in _HELD:
        from fedit.methods import Resources, hparams_for
        from fedit.models.loading import load_model

        if s.threads:
            torch.set_num_threads(s.threads)
        if lm is None:
            lm = load_model(s.model, device=s.device or None, dtype=s.dtype or None, cache_dir=s.cache_dir or None)
        hp = for_form(hparams_for("memit", lm, s.hparam_overrides(), s.hparams_file or None), s.form)
        _HELD[key] = {"lm": lm, "model": PublishedModel(lm), "hp": hp,
                      "res": Resources(cache_dir=s.cache_dir or None, corpus=s.corpus or None)}
    return _HELD[key]


def release() -> None:
    """Forget the models this process holds."""
    for h in _HELD.values():
        h["model"].reset()
    _HELD.clear()


def open_client(s: CollabSettings, node_config: dict[str, Any], saved: tuple[dict, dict] | None,
                secret: dict[str, bytes] | None = None) -> CollabClient:
    """The node's client, with what it saved last. Its facts: ``records`` in its node config (the
    simulation hands each node its own share), else its own file (``data-path``), else its share
    of the run's public dataset (``partition-id`` i plays client ``c<i>``). ``secret``: what the
    node holds and never sends ({"salt", "noise"}: the agreed digest salt, its DP noise seed);
    a salt in the node config wins over the agreed one."""
    h = held(s)
    pid = int(node_config.get("partition-id", -1))
    if not 0 <= pid < s.clients:
        raise CollabError(f"a node has partition-id {pid}, the run has {s.clients} clients.",
                          "start one node per client, with partition-id 0..N-1.")
    if "records" in node_config:
        cid, records = f"c{pid}", node_config["records"]
    else:
        cid, records = client_facts(s, pid, str(node_config.get("data-path", "")))
    secret = secret or {}
    salt = s.node_salt(node_config) or secret.get("salt")
    if not salt:
        raise CollabError("this node has no digest salt: the clients have not agreed one yet.",
                          "the server must run the key agreement (query.keys, query.seal, query.open) first.")
    c = CollabClient(cid, h["model"], h["hp"], h["res"], records, salt, s.residual_tol,
                     "zsre" if s.dataset == "zsre" else "counterfact")
    c.dp, c.noise_seed = s.dp(), secret.get("noise", b"")
    if saved is not None:
        c.restore(*saved)
    if not c.has_pre_scores:
        h["model"].reset()
        c.pre_scores()
    return c


def at_state(c: CollabClient, version: str, delta: dict[int, torch.Tensor]) -> None:
    """Put the model the server published (cumulative Δ, named ``version``) under the client."""
    c.model.set(version, delta)


def shapes(c: CollabClient) -> dict[int, tuple[int, int]]:
    """(d_out, d_in) of W_out per edited layer."""
    return {l: c.model.lm.adapter.w_out_dims(l) for l in c.hp.layers}


def prepare(c: CollabClient, rnd: int, keep: list[int]) -> dict[str, Any]:
    """Edit the kept facts on the model as it is; what the server may learn about it."""
    p = c.prepare(rnd, keep)  # vanished facts by index into the round's list: a case id would name the fact
    return {"used": p.used, "vanished": list(p.vanished), "seconds": p.seconds,
            "exponents": exponents(c.shared_stats(rnd, p), c.hp.layers, shapes(c))}


def stats_arrays(c: CollabClient, rnd: int, keep: list[int]) -> tuple[int, dict[str, torch.Tensor]]:
    """(facts, {"rk.<l>": R Kᵀ, "kk.<l>": K Kᵀ}) of the prepared edit."""
    p = c.prepare(rnd, keep)
    st = c.shared_stats(rnd, p)
    return p.n, {**{f"rk.{l}": s.RK for l, s in st.items()}, **{f"kk.{l}": s.KK for l, s in st.items()}}


def own_update(c: CollabClient, rnd: int, keep: list[int]) -> tuple[int, dict[str, torch.Tensor]]:
    """(facts, {"d.<l>": Δᵢ}) the client's own MEMIT update from the published model (baselines)."""
    p = c.prepare(rnd, keep)
    st = p.stats()
    if not st:
        return 0, {}
    hp = c.hp
    C0 = c.res.second_moments(c.model.lm, hp.layers, hp.mom2_samples, hp.mom2_seq_len)
    return p.n, {f"d.{l}": v for l, v in solve(st, C0, hp.mom2_update_weight).items()}


def _prepared(c: CollabClient, version: str, rnd: int, keep: list[int]):
    p = c.cached(version, rnd, keep)
    if p is None:
        raise CollabError(f"model state {version!r}, round {rnd + 1}: this client has not prepared it.",
                          "send query.prepare first.")
    return p


def secure_limbs(c: CollabClient, version: str, rnd: int, keep: list[int], exps: dict[str, int]) -> list:
    """The prepared statistics as exact integer limbs for SecAgg+ (``collab.secure``)."""
    return encode(c.shared_stats(rnd, _prepared(c, version, rnd, keep)), c.hp.layers, shapes(c), exps)


def layer_arrays(c: CollabClient, version: str, rnd: int, keep: list[int],
                 step: int) -> tuple[int, dict[str, torch.Tensor], dict[str, int]]:
    """Layer-sequential form: (facts, {"rk.<l>", "kk.<l>"} at edited layer ``step`` on the model as it
    is, one exponent per tensor); the targets z are those prepared on model state ``version``."""
    p = _prepared(c, version, rnd, keep)
    l = c.hp.layers[step]
    st = c.layer_stats(rnd, p, step)
    stats = {l: st} if st is not None else {}
    arrays = {f"rk.{l}": st.RK, f"kk.{l}": st.KK} if st is not None else {}
    return p.n, arrays, exponents(stats, [l], {l: shapes(c)[l]})


def secure_layer_limbs(c: CollabClient, step: int, n: int, arrays: dict[str, torch.Tensor],
                       exps: dict[str, int]) -> list:
    """The statistics ``layer_arrays`` gave for edited layer ``step``, as integer limbs for SecAgg+."""
    from fedit.methods.vectors import LayerSums

    l = c.hp.layers[step]
    stats = {l: LayerSums(arrays[f"rk.{l}"].double(), arrays[f"kk.{l}"].double(), n)} if arrays else {}
    return encode(stats, [l], {l: shapes(c)[l]}, exps)


def evaluate(c: CollabClient, upto: int, applied: dict[int, list[int]]) -> dict[int, dict[str, Any]]:
    """Metrics of the facts now on the model, per round of origin ≤ ``upto``."""
    c.kept = dict(applied)
    return c.evaluate(upto)
