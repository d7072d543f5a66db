"""generation_success: greedy continuations checked for the expected answer (evaluate.generation).

On a tiny random model the rates mean nothing, so these tests check the mechanics: batched
greedy decoding equals one prompt at a time, and a model that says the new target after the
edit (and the true answer for neighbours) scores 1 where it should, in the JSON, Markdown
and chart of the report."""

import json

import pytest
import torch

from fedit.data.records import EvalRecord, Probe
from fedit.evaluate import generation
from fedit.evaluate.generation import answer_tokens, contains, greedy, measure_generation
from fedit.evaluate.report import write
from fedit.evaluate.runner import EvalConfig, evaluate
from fedit.testing import tiny_model

from helpers import EIFFEL, FAST, JORDAN, resources


def _records():
    return [EvalRecord(request=EIFFEL, paraphrases=("Where is the Eiffel Tower? In the city of", "The Eiffel Tower stands in"),
                       neighborhood=(Probe("The Louvre is located in the city of", "Paris"),),
                       generation_prompts=("The Eiffel Tower is",)),
            EvalRecord(request=JORDAN, paraphrases=("Michael Jordan is a professional",),
                       neighborhood=(Probe("Larry Bird plays the sport of", "basketball"),
                                     Probe("Magic Johnson plays the sport of", "basketball")))]


def test_contains_ignores_case_and_spacing_but_not_other_words():
    assert contains(" the city of  rome, which", "Rome") and contains("New\nYork City", "new york")
    assert not contains("Romeo and Juliet", "Paris") and not contains("anything", "  ")


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3_text"])
def test_batched_greedy_continuations_equal_one_prompt_at_a_time(arch):
    lm = tiny_model(arch)
    prompts = ["The Eiffel Tower is located in the city of", "Hi", "Michael Jordan plays the sport of", "A B C D"]
    batched = greedy(lm, prompts, max_new_tokens=6, batch_size=3)
    # budgets per prompt: each continuation cut to its own length, whatever its batch ran to
    assert greedy(lm, prompts, [6, 2, 6, 1], batch_size=2) == [batched[0], alone_prefix(lm, prompts[1], 2),
                                                                batched[2], alone_prefix(lm, prompts[3], 1)]
    alone = []
    for p in prompts:
        ids = lm.tokenizer(p, return_tensors="pt")["input_ids"]
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                                pad_token_id=lm.tokenizer.eos_token_id)
        alone.append(lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    assert batched == alone and all(t for t in batched)


def alone_prefix(lm, prompt, n):
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                            pad_token_id=lm.tokenizer.eos_token_id)
    return lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_measure_generation_scores_each_probe_against_its_answer(monkeypatch):
    said = {"The Eiffel Tower is located in the city of": " Rome, Italy", "The Eiffel Tower stands in": " Paris",
            "The Louvre is located in the city of": " Paris.", "Larry Bird plays the sport of": " soccer",
            "Magic Johnson plays the sport of": " Basketball"}
    monkeypatch.setattr(generation, "greedy", lambda lm, prompts, n, bs=32: [said.get(p, "") for p in prompts])
    lm = tiny_model("gpt2")
    raw = measure_generation(lm, _records(), extra_tokens=4)
    assert raw[0] == {"gen_rewrite": {0: 1.0}, "gen_para": {0: 0.0, 1: 0.0}, "gen_nb": {0: 1.0}}
    assert raw[1] == {"gen_rewrite": {0: 0.0}, "gen_para": {0: 0.0}, "gen_nb": {0: 0.0}}  # the first neighbour only
    assert measure_generation(lm, _records(), neighbours=2)[1]["gen_nb"] == {0: 0.0, 1: 1.0}
    assert generation.generation_metrics(raw[0]) == {"generation_efficacy": 1.0, "generation_paraphrase": 0.0,
                                                     "generation_neighborhood": 1.0}


def test_eval_report_has_generation_success_beside_teacher_forcing(tiny_cache, tmp_path, monkeypatch):
    lm = tiny_model("gpt2")
    records = _records()
    w0 = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    answers = {}
    for r in records:
        for p in (r.request.filled_prompt, *r.paraphrases):
            answers[p] = r.request.target_new
        for nb in r.neighborhood:
            answers[nb.prompt] = nb.answer
    seen, prompts_seen = [], []

    def model_that_learns(lm_, prompts, n, bs=32):
        # unedited: says nothing useful except the neighbours' answers; edited: says every answer
        edited = any(not torch.equal(p, w0[k]) for k, p in lm_.model.named_parameters())
        seen.append((edited, n))
        prompts_seen.append(prompts)
        return [f" {answers[p]} and more" if edited or answers[p] in ("Paris", "basketball") else " something"
                for p in prompts]

    monkeypatch.setattr(generation, "greedy", model_that_learns)
    over = {**FAST, "layers": [1, 2]}
    report = evaluate(lm, records, EvalConfig(method="memit", fluency_records=0, greedy_extra_tokens=2), overrides=over,
                      resources=resources(tiny_cache))
    assert [e for e, _ in seen] == [False, True]  # once unedited, once edited
    # each continuation as long as its answer plus 2 tokens
    assert seen[0][1] == [answer_tokens(lm.tokenizer, answers[p]) + 2 for p in prompts_seen[0]]
    pre, post = report["metrics_pre"], report["metrics"]
    assert (pre["generation_efficacy"], pre["generation_paraphrase"], pre["generation_neighborhood"]) == (0, 0, 1)
    assert pre["generation_success"] == 0.0 and post["generation_success"] == 1.0
    assert report["per_record"][1]["post"]["generation_paraphrase"] == 1.0
    assert "generation_success" in report["headline"] and "efficacy_success" in post  # beside teacher forcing
    write(report, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "report.json").read_text())["metrics"]["generation_success"] == 1.0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| generation_success | harmonic mean of the greedy-continuation rates | 0.0 | 100.0 |" in md
    assert "| generation_neighborhood |" in md
    # generation_success=False leaves it out (and costs nothing)
    seen.clear()
    report0 = evaluate(lm, records, EvalConfig(method="memit", fluency_records=0, generation_success=False), overrides=over,
                       resources=resources(tiny_cache))
    assert seen == [] and "generation_success" not in report0["metrics"] and "generation_success" not in report0["headline"]
