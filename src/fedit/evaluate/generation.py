"""Free-generation success: does the edited model *say* the new fact when it continues a prompt?

Teacher-forced rates compare the probabilities of two given answers; a model can prefer the new
target there and still not produce it (arXiv 2502.11177 reads 96 % teacher-forced efficacy
against 38 % in free generation). Here each probe's prompt is continued greedily, batched, for
as many tokens as the expected answer has plus a few (``extra_tokens``: room for "the", a
space or a comma before it), and the continuation is checked for the answer (case and spacing
ignored):

    generation_efficacy      the rewrite prompt's continuation contains the new target
    generation_paraphrase    each paraphrase's continuation contains the new target
    generation_neighborhood  the first ``neighbours`` neighbourhood prompts' continuations still
                             contain their true answer (one by default: CounterFact has ten per
                             record, which would make this three times dearer than teacher forcing)

``generation_success`` (in :func:`fedit.evaluate.runner.aggregate`) is their harmonic mean.
"""

from __future__ import annotations

import torch

from fedit.core.tokens import pad_id
from fedit.data.records import EvalRecord

# raw measurement group -> per-record metric
GROUPS = {"gen_rewrite": "generation_efficacy", "gen_para": "generation_paraphrase",
          "gen_nb": "generation_neighborhood"}


def generation_probes(rec: EvalRecord, neighbours: int = 1) -> list[tuple[str, str, str, int]]:
    """(group, prompt, expected answer, index) for every greedy continuation of a record: the
    rewrite prompt, each paraphrase, the first ``neighbours`` neighbourhood prompts."""
    req = rec.request
    out = [("gen_rewrite", req.filled_prompt, req.target_new, 0)]
    out += [("gen_para", p, req.target_new, i) for i, p in enumerate(rec.paraphrases)]
    out += [("gen_nb", nb.prompt, nb.answer, i) for i, nb in enumerate(rec.neighborhood[:neighbours])]
    return out


def contains(text: str, answer: str) -> bool:
    """Whether ``answer`` occurs in ``text``, ignoring case and runs of whitespace."""
    norm = lambda s: " ".join(s.lower().split())  # noqa: E731
    a = norm(answer)
    return bool(a) and a in norm(text)


@torch.no_grad()
def greedy(lm, prompts: list[str], max_new_tokens: int | list[int], batch_size: int = 32) -> list[str]:
    """Greedy continuations of ``prompts`` (decoded, prompt excluded), ``batch_size`` at a time,
    of ``max_new_tokens`` tokens (one number, or one per prompt).

    Prompts are padded on the left so that every row continues from its last token; rows are
    grouped by length and budget to keep padding and extra steps small. The model is not changed."""
    tok, dev, pid = lm.tokenizer, lm.device, pad_id(lm.tokenizer)
    seqs = [tok(p)["input_ids"] for p in prompts]
    budget = [max_new_tokens] * len(seqs) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    order = sorted(range(len(seqs)), key=lambda i: (budget[i], len(seqs[i])))
    out: list[str] = [""] * len(seqs)
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        T = max(len(seqs[i]) for i in rows)
        ids = torch.full((len(rows), T), pid, dtype=torch.long)  # [b, T]
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for j, i in enumerate(rows):
            ids[j, T - len(seqs[i]):] = torch.tensor(seqs[i], dtype=torch.long)
            mask[j, T - len(seqs[i]):] = 1
        gen = lm.model.generate(ids.to(dev), attention_mask=mask.to(dev), do_sample=False,
                                max_new_tokens=max(budget[i] for i in rows), pad_token_id=pid)  # [b, T + new]
        for j, i in enumerate(rows):
            out[i] = tok.decode(gen[j, T:T + budget[i]], skip_special_tokens=True)
    return out


def answer_tokens(tokenizer, answer: str) -> int:
    """How many tokens ``answer`` takes after a prompt (with its leading space)."""
    return len(tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"])


def measure_generation(lm, records: list[EvalRecord], extra_tokens: int = 3, neighbours: int = 1,
                       batch_size: int = 32) -> list[dict[str, dict[int, float]]]:
    """Per record, {group: {index: 1.0 if the greedy continuation holds the answer else 0.0}};
    each continuation is the answer's length plus ``extra_tokens`` long."""
    flat = [(ri, g, p, a, i) for ri, r in enumerate(records) for g, p, a, i in generation_probes(r, neighbours)]
    budget = [answer_tokens(lm.tokenizer, f[3]) + extra_tokens for f in flat]
    texts = greedy(lm, [f[2] for f in flat], budget, batch_size)
    out: list[dict[str, dict[int, float]]] = [{} for _ in records]
    for (ri, g, _, a, i), t in zip(flat, texts):
        out[ri].setdefault(g, {})[i] = float(contains(t, a))
    return out


def generation_metrics(raw: dict) -> dict[str, float]:
    """The per-record generation metrics of one record's raw measurements (none if not measured)."""
    return {key: sum(raw[g].values()) / len(raw[g]) for g, key in GROUPS.items() if raw.get(g)}
