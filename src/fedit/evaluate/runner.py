"""Edit a model on dataset records and measure it before and after (DESIGN §4).

Pre-edit numbers always come from the unedited model. Without ``sequential``, each batch is
applied, its records measured, and the batch reverted (the papers' protocol: ROME one fact at
a time, MEMIT one batch); with ``sequential`` the batches accumulate and every record is
measured on the final model.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import mean
from typing import Any, Callable

import torch

from fedit.api import edit
from fedit.core.probe import teacher_forced
from fedit.core.tokens import pad_id
from fedit.data.records import EvalRecord
from fedit.deltas import AppliedEdit
from fedit.evaluate import metrics as M
from fedit.evaluate.checkpoint import Checkpoint, CheckpointError, signature

log = logging.getLogger(__name__)

# Headline keys per dataset, and the scoring style of each key.
HEADLINE = {
    "counterfact": ["efficacy_success", "paraphrase_success", "neighborhood_success", "score", "fluency"],
    "zsre": ["efficacy_acc", "paraphrase_acc", "specificity_acc"],
}
STYLE = {
    "efficacy_success": "success", "paraphrase_success": "success", "neighborhood_success": "success",
    "efficacy_magnitude": "probability difference", "paraphrase_magnitude": "probability difference",
    "neighborhood_magnitude": "probability difference", "score": "harmonic mean of success rates",
    "efficacy_acc": "token accuracy", "paraphrase_acc": "token accuracy", "specificity_acc": "token accuracy",
    "portability_acc": "token accuracy", "locality": "top-1 agreement with the unedited model",
    "neighborhood_acc": "token accuracy", "reliability": "token accuracy (EasyEdit name)",
    "generalization": "token accuracy (EasyEdit name)", "portability": "token accuracy (EasyEdit name)",
    "fluency": "n-gram entropy (ROME GE)",
}
EASYEDIT_NAMES = {"reliability": "efficacy_acc", "generalization": "paraphrase_acc", "portability": "portability_acc"}


@dataclass
class EvalConfig:
    method: str = "memit"
    dataset: str = "counterfact"
    batch_size: int | None = None  # None: all records in one batch
    sequential: bool = False
    fluency_records: int = 20  # records whose first generation prompt is generated from (0: skip)
    # Sequential only: measure the records edited so far (and fluency) after every batch, for
    # the curve of a long sequence (report["per_batch"]); False measures once, at the end.
    track_batches: bool = True
    gen_tokens: int = 100
    seed: int = 0


def _probes(rec: EvalRecord) -> list[tuple[str, str, str, int]]:
    """(group, prompt, answer, index) for every teacher-forced measurement of a record."""
    req = rec.request
    out = [("rewrite_new", req.filled_prompt, req.target_new, 0)]
    if req.target_true:
        out.append(("rewrite_true", req.filled_prompt, req.target_true, 0))
    for i, p in enumerate(rec.paraphrases):
        out.append(("para_new", p, req.target_new, i))
        if req.target_true:
            out.append(("para_true", p, req.target_true, i))
    for i, nb in enumerate(rec.neighborhood):
        out.append(("nb_answer", nb.prompt, nb.answer, i))
        if req.target_true:
            out.append(("nb_new", nb.prompt, req.target_new, i))
    for i, pt in enumerate(rec.portability):
        out.append(("port", pt.prompt, pt.answer, i))
    return out


def measure(lm, records: list[EvalRecord], batch_size: int = 32, share: bool = True) -> list[dict[str, Any]]:
    """Raw teacher-forced scores of every probe of every record (one dict per record).

    ``share``: probes whose inputs coincide (the new and the true target after one prompt) are
    read from one forward pass (:func:`fedit.core.probe.teacher_forced`)."""
    flat = [(ri, g, p, a, i) for ri, r in enumerate(records) for (g, p, a, i) in _probes(r)]
    scores = teacher_forced(lm, [f[2] for f in flat], [f[3] for f in flat], batch_size=batch_size, share=share)
    out: list[dict[str, Any]] = [{} for _ in records]
    for (ri, g, _, _, i), s in zip(flat, scores):
        out[ri].setdefault(g, {})[i] = s
    return out


def record_metrics(raw: dict, raw_pre: dict | None, dataset: str) -> dict[str, float]:
    """Per-record metrics from raw scores (``raw_pre``: the unedited model's, for locality)."""
    m: dict[str, float] = {}
    p = lambda s: M.mean_token_prob(s["nll_sum"], s["n_tokens"])  # noqa: E731
    acc = lambda s: M.token_accuracy(s["pred"], s["answer"])  # noqa: E731
    rn = raw["rewrite_new"][0]
    m["efficacy_acc"] = acc(rn)
    if "rewrite_true" in raw:
        rt = raw["rewrite_true"][0]
        m["efficacy_success"] = M.success(p(rn), p(rt))
        m["efficacy_magnitude"] = M.magnitude(p(rn), p(rt))
    if "para_new" in raw:
        idx = sorted(raw["para_new"])
        m["paraphrase_acc"] = mean(acc(raw["para_new"][i]) for i in idx)
        if "para_true" in raw:
            m["paraphrase_success"] = mean(M.success(p(raw["para_new"][i]), p(raw["para_true"][i])) for i in idx)
            m["paraphrase_magnitude"] = mean(M.magnitude(p(raw["para_new"][i]), p(raw["para_true"][i])) for i in idx)
    if "nb_answer" in raw:
        idx = sorted(raw["nb_answer"])
        key = "specificity_acc" if dataset == "zsre" else "neighborhood_acc"
        m[key] = mean(acc(raw["nb_answer"][i]) for i in idx)
        if "nb_new" in raw:
            m["neighborhood_success"] = mean(M.success(p(raw["nb_answer"][i]), p(raw["nb_new"][i])) for i in idx)
            m["neighborhood_magnitude"] = mean(M.magnitude(p(raw["nb_answer"][i]), p(raw["nb_new"][i])) for i in idx)
        if raw_pre is not None:
            m["locality"] = mean(M.agreement(raw_pre["nb_answer"][i]["pred"], raw["nb_answer"][i]["pred"]) for i in idx)
    if "port" in raw:
        m["portability_acc"] = mean(acc(s) for s in raw["port"].values())
    return m


def aggregate(per_record: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in per_record for k in r})
    out = {k: mean(r[k] for r in per_record if k in r) for k in keys}
    if all(k in out for k in ("efficacy_success", "paraphrase_success", "neighborhood_success")):
        out["score"] = M.harmonic_mean([out["efficacy_success"], out["paraphrase_success"],
                                        out["neighborhood_success"]])
    for name, key in EASYEDIT_NAMES.items():
        if key in out:
            out[name] = out[key]
    return out


@torch.no_grad()
def generate(lm, prompts: list[str], max_new_tokens: int, seed: int) -> list[str]:
    """Top-k 5 sampled continuations (seeded), as ROME's fluency evaluation does."""
    tok, dev = lm.tokenizer, lm.device
    texts = []
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        for p in prompts:
            ids = tok(p, return_tensors="pt")["input_ids"].to(dev)
            out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=5,
                                    max_new_tokens=max_new_tokens, pad_token_id=pad_id(tok))
            texts.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts


def _fluency_subset(records: list[EvalRecord], cfg: EvalConfig) -> list[int]:
    """Indices of the records whose first generation prompt is used for fluency."""
    return [i for i, r in enumerate(records) if r.generation_prompts][: max(0, cfg.fluency_records)]


def _generate_for(lm, records: list[EvalRecord], idx: list[int], cfg: EvalConfig) -> dict[int, str]:
    texts = generate(lm, [records[i].generation_prompts[0] for i in idx], cfg.gen_tokens, cfg.seed)
    return dict(zip(idx, texts))


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)


def evaluate(lm, records: list[EvalRecord], cfg: EvalConfig, overrides: dict | None = None,
             hparams_file=None, resources=None, progress: Callable[[int], None] | None = None,
             checkpoint_dir=None, resume: bool = False, pre_cache=None) -> dict[str, Any]:
    """Edit and measure. Returns the report (metrics pre/post, timings, per-record values).

    With ``cfg.sequential`` and a ``checkpoint_dir``, the run is checkpointed after every batch
    (:mod:`fedit.evaluate.checkpoint`); ``resume=True`` continues from the checkpoint there
    (same records, method, batch size, model and overrides), and without it an existing
    checkpoint is refused rather than overwritten. With a ``pre_cache`` folder the unedited
    model's measurements are taken from there when the same weights already measured the same
    probes (:mod:`fedit.evaluate.pre_cache`), and kept there otherwise.
    """
    t0 = time.perf_counter()
    ckpt = None
    if cfg.sequential and checkpoint_dir is not None:
        ckpt = Checkpoint(checkpoint_dir, signature(lm, records, cfg, overrides, hparams_file),
                          hparams=_resolved_hparams(cfg.method, lm, overrides, hparams_file))
        if ckpt.exists() and not resume:
            raise CheckpointError(f"{ckpt.dir} holds the checkpoint of an earlier run.",
                                  "pass --resume to continue it, or use another --out folder.")
    flu_idx = _fluency_subset(records, cfg)
    gen_post: dict[int, str] = {}
    B = cfg.batch_size or len(records)
    batches = [list(range(s, min(s + B, len(records)))) for s in range(0, len(records), B)]
    raw_post: list[dict | None] = [None] * len(records)
    edit_seconds, target_seconds, applied, from_cache = 0.0, 0.0, [], 0
    if torch.cuda.is_available() and lm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(lm.device)
    state = None  # carried between batches only when they accumulate (AlphaEdit)
    per_batch: list[dict[str, Any]] = []
    diagnostics: list[dict[str, Any]] = []  # per batch: what the layer loop did (edit_diagnostics)
    done: list[int] = []
    start, touched, pre_cached = 0, set(), False
    if ckpt is not None and resume and ckpt.exists():
        weights, state, doc = ckpt.load()
        params = dict(lm.model.named_parameters())
        originals = {n: params[n].detach().clone() for n in weights}
        with torch.no_grad():
            for n, w in weights.items():
                params[n].copy_(w.to(device=params[n].device, dtype=params[n].dtype))
        applied.append(AppliedEdit(model=lm.model, deltas=None, originals=originals))
        if hasattr(state, "memory_edit"):  # a memory method's state: reinstall the memory so far
            applied.append(state.memory_edit(lm).apply(lm.model))
        touched = set(weights)
        start, per_batch, done = doc["batches_done"], doc["per_batch"], doc["done"]
        diagnostics = doc.get("diagnostics", [])
        edit_seconds, target_seconds, from_cache = doc["edit_seconds"], doc["target_seconds"], doc["from_cache"]
        raw_pre, gen_pre = doc["raw_pre"], doc["gen_pre"]
        log.info("resuming from %s after batch %d of %d", ckpt.dir, start, len(batches))
        if progress:
            progress(len(done))
    else:
        raw_pre, gen_pre, pre_cached = measure_unedited(lm, records, flu_idx, cfg, pre_cache)
    for bi, b in enumerate(batches):
        if bi < start:
            continue
        res = edit(lm, [records[i].request for i in b], method=cfg.method, overrides=overrides,
                   hparams_file=hparams_file, resources=resources, state=state if cfg.sequential else None)
        state = res.outcome.state
        edit_seconds += res.outcome.seconds
        target_seconds += res.outcome.target_seconds
        from_cache += sum(bool(t.get("cached")) for t in res.outcome.targets)
        if (d := edit_diagnostics(res.outcome.diagnostics)) is not None:
            diagnostics.append({"batch": bi + 1, **d})
        if cfg.sequential:
            applied.append(res.applied)
            done.extend(b)
            if cfg.track_batches and len(batches) > 1 and bi < len(batches) - 1:  # the last: the final measure
                per_batch.append(_checkpoint(lm, records, done, raw_pre, flu_idx, cfg, bi + 1, edit_seconds,
                                             [len(x) for x in batches[:bi + 1]]))
            touched |= set(res.applied.originals)
            if ckpt is not None:
                ckpt.save(lm.model, touched, state, {
                    "batches_done": bi + 1, "per_batch": per_batch, "diagnostics": diagnostics,
                    "done": done, "edit_seconds": edit_seconds,
                    "target_seconds": target_seconds, "from_cache": from_cache, "raw_pre": raw_pre,
                    "gen_pre": gen_pre, "model_name": lm.name})
        else:
            for i, r in zip(b, measure(lm, [records[i] for i in b])):
                raw_post[i] = r
            gen_post.update(_generate_for(lm, records, [i for i in b if i in flu_idx], cfg))
            res.applied.revert()
        if progress:
            progress(len(b))
    if cfg.sequential:
        raw_post = measure(lm, records)
        gen_post = _generate_for(lm, records, flu_idx, cfg)
        for a in reversed(applied):
            a.revert()
    per_pre, pre = _unedited(raw_pre, gen_pre, cfg.dataset)
    per_post = [record_metrics(r, p, cfg.dataset) for r, p in zip(raw_post, raw_pre)]
    post = aggregate(per_post)
    if flu_idx:
        post["fluency"] = M.fluency(gen_post.values())
    if per_batch:
        per_batch.insert(0, _first_row(pre))
        per_batch.append({"batch": len(batches), "edits": len(records), "edit_seconds": round(edit_seconds, 3),
                          "metrics": {k: v for k, v in post.items() if k in _TRACKED},
                          "by_origin": by_origin(per_post, [len(b) for b in batches])})
    report = {
        "method": cfg.method, "dataset": cfg.dataset, "model": lm.name, "n": len(records),
        "batch_size": B, "sequential": cfg.sequential, "config": asdict(cfg),
        "seconds": round(time.perf_counter() - t0, 3), "edit_seconds": round(edit_seconds, 3),
        "seconds_per_edit": round(edit_seconds / max(1, len(records)), 4),
        "target_seconds_share": round(target_seconds / edit_seconds, 4) if edit_seconds else None,
        "targets_from_cache": from_cache,  # their optimisation time is not in edit_seconds
        "pre_from_cache": pre_cached,  # the unedited model's measurements were reused
        "resumed_after_batch": start or None,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "peak_cuda_mb": (round(torch.cuda.max_memory_allocated(lm.device) / 2**20, 1)
                         if lm.device.type == "cuda" else None),
        "metrics": post, "metrics_pre": pre, "styles": {k: STYLE[k] for k in post if k in STYLE},
        "headline": [k for k in (HEADLINE["zsre"] if cfg.dataset == "zsre" else
                                 HEADLINE["counterfact"] + ["portability_acc"]) if k in post or k in pre],
        "consistency": "unavailable: needs idf.npy, tfidf_vocab.json and attribute snippets (not shipped)",
        "per_record": [{"case_id": r.case_id, "pre": a, "post": b} for r, a, b in zip(records, per_pre, per_post)],
        "generations": [{"case_id": records[i].case_id, "prompt": records[i].generation_prompts[0],
                         "pre": gen_pre[i], "post": gen_post.get(i)} for i in flu_idx],
    }
    if per_batch:
        report["per_batch"] = per_batch
    if diagnostics:
        report["edit_diagnostics"] = diagnostics
    return report


def edit_diagnostics(diag: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON part of an edit's layer-loop diagnostics: edited ``layers``, mean residual at the
    last layer before the first and after each one (``residual_norms``), the step scale each
    layer's update was applied with (``step_scales``; 0: backtracking rejected it) and, for
    AlphaEdit, the rank of each layer's null-space projector. None for methods without a
    layer loop (ROME, the base form)."""
    if "step_scales" not in diag:
        return None
    out = {"layers": list(diag["layers"]), "residual_norms": [round(float(x), 4) for x in diag["residual_norms"]],
           "step_scales": [float(x) for x in diag["step_scales"]]}
    if "null_space_rank" in diag:
        out["null_space_rank"] = {str(k): int(v) for k, v in diag["null_space_rank"].items()}
    return out


def _resolved_hparams(method: str, lm, overrides: dict | None, hparams_file) -> dict[str, Any]:
    """The hyperparameters the run edits with, after the data file and the overrides (JSON form)."""
    from fedit.methods import hparams_for

    hp = hparams_for(method, lm, overrides, hparams_file)
    return json.loads(json.dumps(asdict(hp), default=str))


def measure_unedited(lm, records: list[EvalRecord], flu_idx: list[int], cfg: EvalConfig,
                      folder) -> tuple[list[dict], dict[int, str], bool]:
    """(raw measurements, generations, whether they came from the cache) of the unedited model."""
    cache = key = None
    if folder is not None:
        from fedit.evaluate.pre_cache import PreCache

        cache = PreCache(folder)
        key = cache.key(lm, [_probes(r) for r in records], [records[i].generation_prompts[0] for i in flu_idx],
                        cfg.gen_tokens, cfg.seed)
        hit = cache.get(key, len(records))
        if hit is not None:
            log.info("unedited measurements of %d records taken from %s", len(records), folder)
            return *hit, True
    raw, gen = measure(lm, records), _generate_for(lm, records, flu_idx, cfg)
    if cache is not None:
        cache.put(key, raw, gen)
    return raw, gen, False


def _unedited(raw_pre: list[dict], gen_pre: dict[int, str], dataset: str) -> tuple[list[dict], dict[str, float]]:
    """Per-record and aggregate metrics of the unedited model (fluency when there are generations)."""
    per = [record_metrics(r, None, dataset) for r in raw_pre]
    agg = aggregate(per)
    if gen_pre:
        agg["fluency"] = M.fluency(gen_pre.values())
    return per, agg


def _first_row(pre: dict[str, float]) -> dict[str, Any]:
    return {"batch": 0, "edits": 0, "edit_seconds": 0.0, "metrics": {k: v for k, v in pre.items() if k in _TRACKED}}


def curve_so_far(out_dir) -> dict[str, Any]:
    """The per-batch curve of a sequential run that is still going (or was stopped).

    Reads ``OUT/checkpoint/progress.json``, which a sequential run rewrites after every batch,
    and returns the fields of a finished report that a chart needs: ``method``, ``dataset``,
    ``n``, ``batch_size``, ``batches_done``, ``in_progress`` (True) and ``per_batch`` (batch 0 =
    the unedited model over all records, then the records edited so far after each batch).
    """
    ckpt = Checkpoint(Path(out_dir) / "checkpoint", {})
    if not ckpt.exists():
        raise CheckpointError(f"{out_dir} holds neither report.json nor checkpoint/progress.json.",
                              "pass the --out folder of a `fedit eval --sequential` run.")
    doc = ckpt.progress()
    sig = doc["signature"]
    _, pre = _unedited(doc["raw_pre"], doc["gen_pre"], sig["dataset"])
    return {"method": sig["method"], "dataset": sig["dataset"], "model": doc.get("model_name", sig["model"]), "n": sig["n"],
            "batch_size": sig["batch_size"], "batches_done": doc["batches_done"], "in_progress": True,
            "per_batch": [_first_row(pre), *doc["per_batch"]]}


_TRACKED = ("efficacy_success", "paraphrase_success", "neighborhood_success", "score", "fluency", "efficacy_acc",
            "paraphrase_acc", "specificity_acc", "neighborhood_acc", "locality")


def _checkpoint(lm, records: list[EvalRecord], done: list[int], raw_pre: list[dict], flu_idx: list[int],
                cfg: EvalConfig, batch: int, edit_seconds: float, sizes: list[int]) -> dict[str, Any]:
    """Metrics of the records edited so far, and fluency, on the model as it is after ``batch``;
    ``by_origin`` splits them by the batch each record was edited in (``sizes``: the batches' sizes)."""
    raw = measure(lm, [records[i] for i in done])
    per = [record_metrics(r, raw_pre[i], cfg.dataset) for i, r in zip(done, raw)]
    m = aggregate(per)
    if flu_idx:
        m["fluency"] = M.fluency(_generate_for(lm, records, flu_idx, cfg).values())
    return {"batch": batch, "edits": len(done), "edit_seconds": round(edit_seconds, 3),
            "metrics": {k: v for k, v in m.items() if k in _TRACKED}, "by_origin": by_origin(per, sizes)}


_ORIGIN = ("efficacy_success", "paraphrase_success", "neighborhood_success", "score", "efficacy_acc", "paraphrase_acc",
           "locality")


def by_origin(per_record: list[dict[str, float]], sizes: list[int]) -> list[dict[str, Any]]:
    """Aggregates of consecutive runs of ``sizes`` records: one row per batch of origin."""
    rows, s = [], 0
    for j, n in enumerate(sizes, 1):
        m = aggregate(per_record[s:s + n])
        rows.append({"batch": j, "edits": n, "metrics": {k: v for k, v in m.items() if k in _ORIGIN}})
        s += n
    return rows


def retention(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per batch of a sequential run: its edits' metrics right after it was applied and at the end.

    Tells edits that never took (low ``applied``) from edits that were forgotten later
    (``applied`` high, ``final`` lower). Rows: ``batch``, ``edits``, ``applied`` (metrics of that
    batch's records on the model right after it; None where the run did not record it) and
    ``final`` (after the last batch; None for a run in progress). Reads the ``by_origin`` split of
    each ``per_batch`` row; reports written before it existed give ``applied`` for the first
    batch only (its row covers nothing else) and ``final`` from ``per_record``.
    """
    B, n = report["batch_size"], report["n"]
    sizes = [min(B, n - s) for s in range(0, n, B)]
    if len(sizes) < 2 or report.get("sequential") is False:
        return []
    rows = [r for r in report.get("per_batch", []) if r["edits"] > 0]
    out = [{"batch": j, "edits": k, "applied": None, "final": None} for j, k in enumerate(sizes, 1)]
    for r in rows:
        j = r["batch"]
        if r.get("by_origin"):
            out[j - 1]["applied"] = r["by_origin"][j - 1]["metrics"]
        elif j == 1:
            out[0]["applied"] = {k: v for k, v in r["metrics"].items() if k in _ORIGIN}
    if not report.get("in_progress"):
        last = rows[-1] if rows else {}
        if last.get("by_origin") and last["edits"] == n:
            finals = [o["metrics"] for o in last["by_origin"]]
        elif report.get("per_record"):
            finals = [o["metrics"] for o in by_origin([p["post"] for p in report["per_record"]], sizes)]
        else:
            finals = [None] * len(sizes)
        for o, f in zip(out, finals):
            o["final"] = f
    return out
