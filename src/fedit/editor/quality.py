"""EasyEdit's edit-quality measures on fedit's probe code, in EasyEdit's metric shape.

Per case (``compute_edit_quality`` in EasyEdit):

* ``rewrite_acc``: token accuracy of ``target_new`` after the prompt under teacher forcing
  (the fraction of its tokens that are the model's top-1 prediction), as a one-entry list;
* ``rephrase_acc``: the same on each rephrased prompt (present when there are any);
* ``portability``: ``{"<key>_acc": [token accuracy of each probe's answer]}``;
* ``locality``: ``{"<key>_acc": [agreement of each probe's top-1 predictions after the edit
  with those before it]}``, post-edit only (the pre-edit model agrees with itself; ``pre``
  keeps an empty dict here where EasyEdit drops the key).

Values are lists, one entry per prompt, as EasyEdit reports them.
"""

from __future__ import annotations

from statistics import mean
from typing import Any

from fedit.core.probe import teacher_forced
from fedit.editor.cases import Case
from fedit.evaluate import metrics as M


def _probes(case: Case) -> list[tuple[str, str | None, str, str]]:
    """(group, key, prompt, answer) of every teacher-forced measurement of a case."""
    req = case.request
    out = [("rewrite", None, req.filled_prompt, req.target_new)]
    out += [("rephrase", None, p, req.target_new) for p in case.rephrase]
    for group, probes in (("locality", case.locality), ("portability", case.portability)):
        out += [(group, key, p.prompt, p.answer) for key, ps in probes.items() for p in ps]
    return out


def measure(lm, cases: list[Case]) -> list[dict[tuple[str, str | None], list[dict]]]:
    """Raw teacher-forced scores of every probe of every case, on the model as it is now:
    per case ``{(group, key): [score per prompt]}`` (scores as :func:`fedit.core.probe.teacher_forced`)."""
    flat = [(ci, g, k, p, a) for ci, c in enumerate(cases) for g, k, p, a in _probes(c)]
    scores = teacher_forced(lm, [f[3] for f in flat], [f[4] for f in flat])
    out: list[dict] = [{} for _ in cases]
    for (ci, g, k, _, _), s in zip(flat, scores):
        out[ci].setdefault((g, k), []).append(s)
    return out


def _acc(s: dict) -> float:
    return M.token_accuracy(s["pred"], s["answer"])


def quality(raw: dict, raw_pre: dict | None = None) -> dict[str, Any]:
    """One case's metrics in EasyEdit's shape; ``raw_pre`` (the unedited model's scores) turns
    on locality, measured as agreement with it."""
    out: dict[str, Any] = {"rewrite_acc": [_acc(s) for s in raw[("rewrite", None)]]}
    if ("rephrase", None) in raw:
        out["rephrase_acc"] = [_acc(s) for s in raw[("rephrase", None)]]
    out["locality"] = {}
    out["portability"] = {}
    for (group, key), scores in raw.items():
        if group == "portability":
            out["portability"][f"{key}_acc"] = [_acc(s) for s in scores]
        elif group == "locality" and raw_pre is not None:
            before = raw_pre[(group, key)]
            out["locality"][f"{key}_acc"] = [M.agreement(b["pred"], s["pred"]) for b, s in zip(before, scores)]
    return out


def fluency(lm, prompts: list[str], max_new_tokens: int = 100, seed: int = 0) -> dict[str, float]:
    """EasyEdit's ``test_generation`` measure: the n-gram entropy of a sampled continuation of
    each prompt, averaged (``{"ngram_entropy": ...}``)."""
    from fedit.evaluate.runner import generate

    return {"ngram_entropy": M.fluency(generate(lm, prompts, max_new_tokens, seed))}


def summary_metrics(all_metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over cases of every measure, pre and post (EasyEdit's ``summary_metrics``,
    returned instead of printed): ``{"pre": {"rewrite_acc": .., "locality": {"<key>_acc": ..}}, "post": ..}``."""
    out: dict[str, Any] = {}
    for phase in ("pre", "post"):
        rows = [m[phase] for m in all_metrics if phase in m]
        res: dict[str, Any] = {}
        for key in ("rewrite_acc", "rephrase_acc"):
            vals = [mean(r[key]) for r in rows if r.get(key)]
            if vals:
                res[key] = mean(vals)
        for group in ("locality", "portability"):
            keys = sorted({k for r in rows for k in r.get(group, {})})
            sub = {k: mean(mean(r[group][k]) for r in rows if r[group].get(k)) for k in keys
                   if any(r[group].get(k) for r in rows)}
            if sub:
                res[group] = sub
        if any("fluency" in r for r in rows):
            res["fluency"] = {"ngram_entropy": mean(r["fluency"]["ngram_entropy"] for r in rows if "fluency" in r)}
        out[phase] = res
    return out
