"""Read activations at a subject's last token, e.g. keys (inputs of W_out)."""

from __future__ import annotations

import torch

from fedit.core.hooks import capture, run_until_stop
from fedit.core.templates import flat
from fedit.core.tokens import subject_batch
from fedit.requests import EditRequest


@torch.no_grad()
def at_subject(lm, requests: list[EditRequest], templates: list[str], modules: dict[str, str],
               batch_size: int = 64) -> dict[str, torch.Tensor]:
    """For each named module, the input or output at the subject's last token.

    ``modules`` maps a label to ``"<module name>:input"`` or ``"<module name>:output"``.
    Returns ``{label: [len(requests), len(templates), d]}``; the pass stops after the deepest
    module it needs.
    """
    names = {lbl: spec.rsplit(":", 1) for lbl, spec in modules.items()}
    mods = {n: lm.adapter.module(n) for n, _ in names.values()}
    want_in = any(kind == "input" for _, kind in names.values())
    want_out = any(kind == "output" for _, kind in names.values())
    batch = subject_batch(lm.tokenizer, templates, requests).to(lm.device)
    rows: dict[str, list[torch.Tensor]] = {lbl: [] for lbl in names}
    B = batch.input_ids.shape[0]
    for s in range(0, B, batch_size):
        sl = slice(s, s + batch_size)
        with capture(mods, inputs=want_in, outputs=want_out, stop_when_done=True) as store:
            run_until_stop(lambda: lm.adapter.body()(input_ids=batch.input_ids[sl],
                                                     attention_mask=batch.attention_mask[sl]))
        idx = torch.arange(batch.input_ids[sl].shape[0], device=lm.device)
        for lbl, (n, kind) in names.items():
            rows[lbl].append(store[n][kind][idx, batch.lookup[sl]])
    return {lbl: torch.cat(v).reshape(len(requests), len(templates), -1) for lbl, v in rows.items()}


def keys(lm, layers: list[int], requests: list[EditRequest], template_groups: list[list[str]]) -> dict[int, torch.Tensor]:
    """Keys k (inputs of W_out at the subject's last token), one [n, d_in] matrix per layer.

    Averaged within each template group, then across groups (MEMIT's weighting: with groups
    ``[["{}"], five generated]`` the bare prompt weighs one half). ROME's flat average is a
    single group.
    """
    templates = flat(template_groups)
    acts = at_subject(lm, requests, templates, {l: f"{lm.adapter.w_out_name(l)}:input" for l in layers})
    out = {}
    for l in layers:
        a = acts[l]  # [n, n_templates, d_in]
        means, start = [], 0
        for g in template_groups:
            means.append(a[:, start:start + len(g)].mean(1))
            start += len(g)
        out[l] = torch.stack(means, 0).mean(0)
    return out
