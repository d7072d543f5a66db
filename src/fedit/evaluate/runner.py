"""Edit a model on dataset records and measure it before and after; see docs/evaluation.md.

Pre-edit numbers always come from the unedited model. Without ``sequential``, each batch is
applied, its records measured, and the batch reverted (the papers' protocol: ROME one fact at
a time, MEMIT one batch); with ``sequential`` the batches accumulate and every record is
measured on the final model.
"""

from __future__ import annotations

import bisect
import json
import logging
import resource
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from statistics import mean
from typing import Any, Callable

import torch

from fedit import progress
from fedit.api import edit
from fedit.core.probe import teacher_forced
from fedit.core.tokens import pad_id
from fedit.data.records import EvalRecord
from fedit.deltas import WeightDeltas, assign_weights
from fedit.evaluate import metrics as M
from fedit.evaluate.checkpoint import Checkpoint, CheckpointError, signature
from fedit.evaluate.generation import GROUPS as GENERATION_GROUPS
from fedit.evaluate.generation import generation_metrics, measure_generation

log = logging.getLogger(__name__)

# Headline keys per dataset, and the scoring style of each key.
HEADLINE = {
    "counterfact": ["efficacy_success", "paraphrase_success", "neighborhood_success", "score", "generation_success",
                    "fluency"],
    "zsre": ["efficacy_acc", "paraphrase_acc", "specificity_acc", "generation_success"],
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
    "generation_success": "harmonic mean of the greedy-continuation rates",
    "generation_efficacy": "greedy continuation contains the new target",
    "generation_paraphrase": "greedy continuation contains the new target",
    "generation_neighborhood": "greedy continuation still contains the true answer",
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
    track_every: int = 1  # with track_batches: measure after every track_every-th batch only
    gen_tokens: int = 100
    seed: int = 0
    # generation_success (evaluate.generation): greedy continuations of each rewrite, paraphrase
    # and of the first greedy_neighbours neighbourhood prompts, as long as the expected answer
    # plus greedy_extra_tokens
    generation_success: bool = True
    greedy_extra_tokens: int = 3
    greedy_neighbours: int = 1


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


def measure_all(lm, records: list[EvalRecord], cfg: EvalConfig) -> list[dict[str, Any]]:
    """:func:`measure`, plus the greedy continuations of ``generation_success`` when
    ``cfg.generation_success`` (one dict per record)."""
    raw = measure(lm, records)
    if cfg.generation_success:
        for r, g in zip(raw, measure_generation(lm, records, cfg.greedy_extra_tokens, cfg.greedy_neighbours)):
            r.update(g)
    return raw


def measure(lm, records: list[EvalRecord], batch_size: int = 32, share: bool = True) -> list[dict[str, Any]]:
    """Raw teacher-forced scores of every probe of every record (one dict per record).

    ``share``: probes whose inputs coincide (the new and the true target after one prompt) are
    read from one forward pass (:func:`fedit.core.probe.teacher_forced`)."""
    flat = [(ri, g, p, a, i) for ri, r in enumerate(records) for (g, p, a, i) in _probes(r)]
    out: list[dict[str, Any]] = [{} for _ in records]
    # Scored about one batch of probes at a time so that progress moves per record.
    step = max(1, batch_size * len(records) // max(1, len(flat)))
    with progress.task("measuring", total=len(records), unit="record") as bar:
        rec_of = [f[0] for f in flat]  # ascending: the probes of records lo..lo+step-1 are one slice
        for lo in range(0, len(records), step):
            part = flat[bisect.bisect_left(rec_of, lo):bisect.bisect_left(rec_of, lo + step)]
            scores = teacher_forced(lm, [f[2] for f in part], [f[3] for f in part], batch_size=batch_size, share=share)
            for (ri, g, _, _, i), s in zip(part, scores):
                out[ri].setdefault(g, {})[i] = s
            bar.update(min(step, len(records) - lo))
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
    m.update(generation_metrics(raw))
    return m


def aggregate(per_record: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in per_record for k in r})
    out = {k: mean(r[k] for r in per_record if k in r) for k in keys}
    if all(k in out for k in ("efficacy_success", "paraphrase_success", "neighborhood_success")):
        out["score"] = M.harmonic_mean([out["efficacy_success"], out["paraphrase_success"],
                                        out["neighborhood_success"]])
    if rates := [out[k] for k in GENERATION_GROUPS.values() if k in out]:
        out["generation_success"] = M.harmonic_mean(rates)
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
    """Indices of the records generated from for fluency: the first ``cfg.fluency_records`` with
    a generation prompt, or, in a dataset without them (zsRE), the first records."""
    have = [i for i, r in enumerate(records) if r.generation_prompts] or list(range(len(records)))
    return have[: max(0, cfg.fluency_records)]


def _generation_prompt(record: EvalRecord) -> str:
    """The record's first generation prompt; a dataset without them (zsRE) generates from the
    edited prompt itself, as EasyEdit measures fluency on question datasets."""
    return record.generation_prompts[0] if record.generation_prompts else record.request.filled_prompt


def _generate_for(lm, records: list[EvalRecord], idx: list[int], cfg: EvalConfig) -> dict[int, str]:
    texts = generate(lm, [_generation_prompt(records[i]) for i in idx], cfg.gen_tokens, cfg.seed)
    return dict(zip(idx, texts))


def _peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    kb = resource.getrusage(who).ru_maxrss
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)


def _peak_worker_rss_mb() -> float | None:
    """The largest RSS any finished worker process reached (target workers, ``v_workers``), or None.
    A forked worker's RSS counts the pages it still shares with this process."""
    mb = _peak_rss_mb(resource.RUSAGE_CHILDREN)
    return round(mb, 1) if mb > 0 else None


@dataclass
class _Run:
    """What a run has done so far; a sequential run's checkpoint keeps it (``progress.json``)."""

    raw_pre: list[dict]  # the unedited model's raw measurements, per record
    gen_pre: dict[int, str]  # and its generations, by record index
    pre_cached: bool = False  # raw_pre/gen_pre came from the pre-cache
    resumed_after: int = 0  # batches a checkpoint had done before this session
    batches_done: int = 0
    per_batch: list[dict[str, Any]] = field(default_factory=list)  # the curve (sequential)
    diagnostics: list[dict[str, Any]] = field(default_factory=list)  # per batch: what the layer loop did
    done: list[int] = field(default_factory=list)  # records edited so far (sequential)
    edit_seconds: float = 0.0
    target_seconds: float = 0.0
    from_cache: int = 0  # targets taken from the target cache
    state: Any = None  # a stateful method's state, carried between sequential batches
    touched: set[str] = field(default_factory=set)  # parameters the edits so far changed
    # per batch: its edits, its own edit seconds, target seconds and the process's peak RSS so far
    batch_costs: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def resumed(cls, doc: dict[str, Any], state, touched: set[str]) -> "_Run":
        return cls(raw_pre=doc["raw_pre"], gen_pre=doc["gen_pre"], resumed_after=doc["batches_done"],
                   batches_done=doc["batches_done"], per_batch=doc["per_batch"],
                   diagnostics=doc.get("diagnostics", []), done=doc["done"], edit_seconds=doc["edit_seconds"],
                   target_seconds=doc["target_seconds"], from_cache=doc["from_cache"], state=state,
                   touched=touched, batch_costs=doc.get("batch_costs", []))

    def progress(self, model_name: str) -> dict[str, Any]:
        """The progress document of a checkpoint."""
        return {"batches_done": self.batches_done, "per_batch": self.per_batch, "diagnostics": self.diagnostics,
                "done": self.done, "edit_seconds": self.edit_seconds, "target_seconds": self.target_seconds,
                "from_cache": self.from_cache, "raw_pre": self.raw_pre, "gen_pre": self.gen_pre,
                "model_name": model_name, "batch_costs": self.batch_costs}


def evaluate(lm, records: list[EvalRecord], cfg: EvalConfig, overrides: dict | None = None,
             hparams_file=None, resources=None, progress: Callable[[int], None] | None = None,
             checkpoint_dir=None, resume: bool = False, pre_cache=None) -> dict[str, Any]:
    """Edit and measure. Returns the report (metrics pre/post, timings, per-record values).

    With ``cfg.sequential`` and a ``checkpoint_dir``, the run is checkpointed after every batch
    (:mod:`fedit.evaluate.checkpoint`); ``resume=True`` continues from the checkpoint there
    (same records, method, batch size, model and overrides), and without it an existing
    checkpoint is refused rather than overwritten. With a ``pre_cache`` folder the unedited
    model's measurements are taken from there when the same weights already measured the same
    probes (:mod:`fedit.evaluate.pre_cache`), and kept there otherwise. The model's weights are
    the same at the end as at the start, also when the run fails or is stopped.
    """
    t0 = time.perf_counter()
    ckpt = _open_checkpoint(lm, records, cfg, overrides, hparams_file, checkpoint_dir, resume)
    flu_idx = _fluency_subset(records, cfg)
    B = cfg.batch_size or len(records)
    batches = [list(range(s, min(s + B, len(records)))) for s in range(0, len(records), B)]
    edit_batch = partial(_edit_batch, lm, records, cfg, overrides=overrides, hparams_file=hparams_file,
                         resources=resources)
    if torch.cuda.is_available() and lm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(lm.device)
    with ExitStack() as edits:  # every edit of the run is reverted when it leaves, however it ends
        run = _begin(lm, records, cfg, flu_idx, ckpt if resume else None, pre_cache, edits)
        if run.resumed_after:
            log.info("resuming from %s after batch %d of %d", ckpt.dir, run.resumed_after, len(batches))
            if progress:
                progress(len(run.done))
        if cfg.sequential:
            raw_post, gen_post = _edit_in_sequence(lm, records, cfg, batches, run, edit_batch, edits, flu_idx,
                                                   ckpt, progress)
        else:
            raw_post, gen_post = _edit_one_batch_at_a_time(lm, records, cfg, batches, run, edit_batch, flu_idx,
                                                           progress)
    return _report(lm, records, cfg, run, raw_post, gen_post, flu_idx, [len(b) for b in batches],
                   time.perf_counter() - t0)


def _open_checkpoint(lm, records, cfg: EvalConfig, overrides, hparams_file, folder, resume: bool) -> Checkpoint | None:
    """The checkpoint of a sequential run with a folder (None otherwise); refuses to overwrite one
    unless resuming."""
    if not cfg.sequential or folder is None:
        return None
    ckpt = Checkpoint(folder, signature(lm, records, cfg, overrides, hparams_file),
                      hparams=_resolved_hparams(cfg.method, lm, overrides, hparams_file))
    if ckpt.exists() and not resume:
        raise CheckpointError(f"{ckpt.dir} holds the checkpoint of an earlier run.",
                              "pass --resume to continue it, or use another --out folder.")
    return ckpt


def _begin(lm, records: list[EvalRecord], cfg: EvalConfig, flu_idx: list[int], ckpt: Checkpoint | None,
           pre_cache, edits: ExitStack) -> _Run:
    """A fresh run (the unedited model measured) or, from an existing checkpoint, the run it
    holds with its weights set on the model (reverted when ``edits`` closes)."""
    if ckpt is not None and ckpt.exists():
        weights, state, doc = ckpt.load()
        edits.enter_context(assign_weights(lm.model, weights))
        if hasattr(state, "memory_edit"):  # a memory method's state: reinstall the memory so far
            edits.enter_context(state.memory_edit(lm).applied(lm.model))
        return _Run.resumed(doc, state, set(weights))
    raw_pre, gen_pre, pre_cached = measure_unedited(lm, records, flu_idx, cfg, pre_cache)
    return _Run(raw_pre, gen_pre, pre_cached=pre_cached)


def _edit_batch(lm, records: list[EvalRecord], cfg: EvalConfig, batch: list[int], number: int, run: _Run,
                **edit_kw) -> WeightDeltas:
    """Compute (not apply) the edit of the records ``batch`` on the model as it is, batch
    ``number`` (from 1); adds its timings, state and diagnostics to ``run``."""
    out = edit(lm, [records[i].request for i in batch], method=cfg.method, apply=False, check=False,
               state=run.state if cfg.sequential else None, **edit_kw).outcome
    run.state = out.state
    run.edit_seconds += out.seconds
    run.target_seconds += out.target_seconds
    run.from_cache += sum(bool(t.get("cached")) for t in out.targets)
    run.batch_costs.append({"batch": number, "edits": len(batch), "edit_seconds": round(out.seconds, 3),
                            "target_seconds": round(out.target_seconds, 3),
                            "targets_from_cache": sum(bool(t.get("cached")) for t in out.targets),
                            "peak_rss_mb": round(_peak_rss_mb(), 1), "peak_rss_workers_mb": _peak_worker_rss_mb()})
    if (d := edit_diagnostics(out.diagnostics)) is not None:
        run.diagnostics.append({"batch": number, **d})
    return out.deltas


def _edit_one_batch_at_a_time(lm, records: list[EvalRecord], cfg: EvalConfig, batches: list[list[int]], run: _Run,
                              edit_batch, flu_idx: list[int], progress) -> tuple[list[dict], dict[int, str]]:
    """Each batch edited on the unedited model, its records measured, the batch reverted.
    Returns the raw measurements and generations after the edits."""
    raw_post: list[dict | None] = [None] * len(records)
    gen_post: dict[int, str] = {}
    for bi, b in enumerate(batches):
        with edit_batch(b, bi + 1, run).applied(lm.model):
            for i, r in zip(b, measure_all(lm, [records[i] for i in b], cfg)):
                raw_post[i] = r
            gen_post.update(_generate_for(lm, records, [i for i in b if i in flu_idx], cfg))
        if progress:
            progress(len(b))
    return raw_post, gen_post


def _edit_in_sequence(lm, records: list[EvalRecord], cfg: EvalConfig, batches: list[list[int]], run: _Run,
                      edit_batch, edits: ExitStack, flu_idx: list[int], ckpt: Checkpoint | None,
                      progress) -> tuple[list[dict], dict[int, str]]:
    """The batches not done yet, each edited on the model as the ones before left it and kept
    (until ``edits`` closes); the curve point and the checkpoint after each. Returns the raw
    measurements and generations of every record on the final model."""
    for bi in range(run.batches_done, len(batches)):
        b = batches[bi]
        touched = edits.enter_context(edit_batch(b, bi + 1, run).applied(lm.model)).originals
        run.done.extend(b)
        run.touched |= set(touched)
        run.batches_done = bi + 1
        if (cfg.track_batches and len(batches) > 1 and bi < len(batches) - 1  # the last: the final measure
                and (bi + 1) % max(1, cfg.track_every) == 0):
            run.per_batch.append(_measure_so_far(lm, records, run.done, run.raw_pre, flu_idx, cfg, bi + 1,
                                                 run.edit_seconds, [len(x) for x in batches[:bi + 1]]))
        if ckpt is not None:
            ckpt.save(lm.model, run.touched, run.state, run.progress(lm.name))
        if progress:
            progress(len(b))
    return measure_all(lm, records, cfg), _generate_for(lm, records, flu_idx, cfg)


def _report(lm, records: list[EvalRecord], cfg: EvalConfig, run: _Run, raw_post: list[dict],
            gen_post: dict[int, str], flu_idx: list[int], sizes: list[int], seconds: float) -> dict[str, Any]:
    """The report of a finished run (``sizes``: the batches' sizes; ``seconds``: the whole run)."""
    per_pre, pre = _unedited(run.raw_pre, run.gen_pre, cfg.dataset)
    per_post = [record_metrics(r, p, cfg.dataset) for r, p in zip(raw_post, run.raw_pre)]
    post = aggregate(per_post)
    if flu_idx:
        post["fluency"] = M.fluency(gen_post.values())
    per_batch = run.per_batch
    if per_batch:
        per_batch = [_first_row(pre), *per_batch,
                     {"batch": len(sizes), "edits": len(records), "edit_seconds": round(run.edit_seconds, 3),
                      "metrics": {k: v for k, v in post.items() if k in _TRACKED}, "by_origin": by_origin(per_post, sizes)}]
    n, es = len(records), run.edit_seconds
    report = {
        "method": cfg.method, "dataset": cfg.dataset, "model": lm.name, "n": n,
        "batch_size": cfg.batch_size or n, "sequential": cfg.sequential, "config": asdict(cfg),
        "seconds": round(seconds, 3), "edit_seconds": round(es, 3), "seconds_per_edit": round(es / max(1, n), 4),
        "target_seconds_share": round(run.target_seconds / es, 4) if es else None,
        "targets_from_cache": run.from_cache,  # their optimisation time is not in edit_seconds
        "pre_from_cache": run.pre_cached,  # the unedited model's measurements were reused
        "resumed_after_batch": run.resumed_after or None,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "peak_rss_workers_mb": _peak_worker_rss_mb(),  # forked target workers (v_workers > 1), else None
        "peak_cuda_mb": (round(torch.cuda.max_memory_allocated(lm.device) / 2**20, 1)
                         if lm.device.type == "cuda" else None),
        "metrics": post, "metrics_pre": pre, "styles": {k: STYLE[k] for k in post if k in STYLE},
        "headline": [k for k in (HEADLINE["zsre"] if cfg.dataset == "zsre" else
                                 HEADLINE["counterfact"] + ["portability_acc"]) if k in post or k in pre],
        "consistency": "unavailable: needs idf.npy, tfidf_vocab.json and attribute snippets (not shipped)",
        "per_record": [{"case_id": r.case_id, "pre": a, "post": b} for r, a, b in zip(records, per_pre, per_post)],
        "generations": [{"case_id": records[i].case_id, "prompt": _generation_prompt(records[i]),
                         "pre": run.gen_pre[i], "post": gen_post.get(i)} for i in flu_idx],
    }
    if per_batch:
        report["per_batch"] = per_batch
    if run.diagnostics:
        report["edit_diagnostics"] = run.diagnostics
    if run.batch_costs:  # the cost curve: seconds per batch against edits so far (docs/benchmarks.md)
        report["batch_costs"] = run.batch_costs
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
        key = cache.key(lm, [_probes(r) for r in records], [_generation_prompt(records[i]) for i in flu_idx],
                        cfg.gen_tokens, cfg.seed,
                        [cfg.greedy_extra_tokens, cfg.greedy_neighbours] if cfg.generation_success else None)
        hit = cache.get(key, len(records))
        if hit is not None:
            log.info("unedited measurements of %d records taken from %s", len(records), folder)
            return *hit, True
    raw, gen = measure_all(lm, records, cfg), _generate_for(lm, records, flu_idx, cfg)
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


def _measure_so_far(lm, records: list[EvalRecord], done: list[int], raw_pre: list[dict], flu_idx: list[int],
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
