"""The EasyEdit-compatible editor: hyperparameters (fedit's and EasyEdit YAML), request dicts,
edit() in EasyEdit's metric shape, sequential and batch editing, on tiny random models."""

from pathlib import Path

import pytest
import torch

import fedit
from fedit import BaseEditor, EditRequest, RequestError, load_hparams
from fedit.core.probe import teacher_forced
from fedit.errors import FeditError, HparamsError
from fedit.methods import METHODS, EditOutcome, Method, register
from fedit.requests import as_requests, load_requests
from fedit.testing import tiny_model

from helpers import FAST, resources

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "easyedit"

# Prompts that end with the subject: a tiny random model carries an edit at the subject's last
# token to its prediction without attention having to move it (its attention is near uniform).
PROMPTS = ["Last summer we visited the Eiffel Tower", "My favourite athlete is Michael Jordan"]
SUBJECTS = ["Eiffel Tower", "Michael Jordan"]
TARGETS = ["Rome", "soccer"]
TRUTHS = ["Paris", "basketball"]
LOCALITY = {"neighborhood": {"prompt": ["The capital of Japan is", "Paris is the capital of"],
                             "ground_truth": ["Tokyo", "France"]}}
PORTABILITY = {"one_hop": {"prompt": ["The Eiffel Tower's city is the capital of", "The sport Jordan plays uses a"],
                           "ground_truth": ["Italy", "ball"]}}
MEMIT = {**FAST, "layers": [1, 2], "mom2_update_weight": 10.0, "v_lr": 1.0, "clamp_norm_factor": 8.0}
ALPHA = {"nullspace_threshold": 0.05, "alpha": 0.01}  # a null space the tiny model's statistics leave room for


def _weights(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def _same(a, b):
    return all(torch.equal(a[n], b[n]) for n in a)


def _editor(lm, method, tiny_cache, **over):
    base = {"rome": {**FAST, "layers": [1]}, "alphaedit": {**MEMIT, **ALPHA}}.get(method, MEMIT)
    hp = load_hparams(method, model=lm, **{**base, **over})
    return BaseEditor.from_hparams(hp, resources=resources(tiny_cache))


def _top1(lm, prompts, targets):
    return [s["pred"] == s["answer"] for s in teacher_forced(lm, prompts, targets)]


def test_load_hparams_attaches_method_and_model_and_validates_changes():
    lm = tiny_model("gpt2")
    hp = load_hparams("ROME", model=lm, layers=[2])
    assert (hp.alg_name, hp.model_name, hp.layers) == ("rome", lm.name, [2])
    assert hp.hparams == fedit.hparams_for("rome", lm, {"layers": [2]})
    hp.v_lr = 0.1
    assert hp.hparams.v_lr == 0.1
    with pytest.raises(HparamsError, match="exactly one layer"):
        hp.layers = [1, 2]  # validated by ROME's dataclass at once
    with pytest.raises(HparamsError, match="no hyperparameter 'v_learning_rate'"):
        hp.v_learning_rate = 0.1
    with pytest.raises(FeditError, match="unknown editing method"):
        load_hparams("nosuchmethod", model=lm)


def test_edit_reports_easyedit_metrics_and_keeps_every_edit(tiny_cache):
    lm = tiny_model("gpt2")
    w0 = _weights(lm)
    editor = _editor(lm, "rome", tiny_cache)
    metrics, model, weights_copy = editor.edit(
        prompts=PROMPTS, subject=SUBJECTS, target_new=TARGETS, ground_truth=TRUTHS,
        rephrase_prompts=["We visited the Eiffel Tower", "The athlete I like most is Michael Jordan"],
        locality_inputs=LOCALITY, portability_inputs=PORTABILITY, verbose=False)
    assert model is lm.model and len(metrics) == 2
    for i, m in enumerate(metrics):
        assert set(m) == {"case_id", "requested_rewrite", "time", "pre", "post"} and m["case_id"] == i
        rw = m["requested_rewrite"]
        assert (rw["prompt"], rw["subject"], rw["target_new"], rw["ground_truth"]) == (
            PROMPTS[i], SUBJECTS[i], TARGETS[i], TRUTHS[i])
        assert rw["locality"]["neighborhood"]["prompt"] == LOCALITY["neighborhood"]["prompt"][i]
        assert set(m["pre"]) == set(m["post"]) == {"rewrite_acc", "rephrase_acc", "locality", "portability"}
        assert m["pre"]["locality"] == {} and len(m["post"]["locality"]["neighborhood_acc"]) == 1
        assert set(m["post"]["portability"]) == {"one_hop_acc"}
        assert m["pre"]["rewrite_acc"] == [0.0] and m["post"]["rewrite_acc"] == [1.0]
        assert m["time"] > 0
    summary = fedit.summary_metrics(metrics)
    assert summary["post"]["rewrite_acc"] == 1.0 and summary["pre"]["rewrite_acc"] == 0.0
    # each fact was measured on its own; the model given back carries both
    assert _top1(lm, PROMPTS, TARGETS) == [True, True]
    assert len(editor.edits) == 2 and all(isinstance(e, fedit.WeightDeltas) for e in editor.edits)
    # weights_copy restores the model exactly
    assert set(weights_copy) == {lm.adapter.w_out_param_name(1)}
    params = dict(lm.model.named_parameters())
    with torch.no_grad():
        for name, original in weights_copy.items():
            params[name].copy_(original)
    assert _same(w0, _weights(lm))


def test_batch_method_edits_once_and_keep_original_weight_restores(tiny_cache):
    lm = tiny_model("gpt2")
    w0 = _weights(lm)
    editor = _editor(lm, "memit", tiny_cache)
    metrics, _, weights_copy = editor.edit(prompts=PROMPTS, subject=SUBJECTS, target_new=TARGETS,
                                           keep_original_weight=True, verbose=False)
    assert len(editor.edits) == 1 and len(editor.edits[0].requests) == 2  # one batch of two
    assert [m["post"]["rewrite_acc"] for m in metrics] == [[1.0], [1.0]]
    assert metrics[0]["requested_rewrite"]["ground_truth"] == "<|endoftext|>"  # EasyEdit's "unknown"
    assert "rephrase_acc" not in metrics[0]["post"]
    assert _same(w0, _weights(lm))  # measured, then reverted
    assert set(weights_copy) == {lm.adapter.w_out_param_name(1), lm.adapter.w_out_param_name(2)}
    # batch_edit: batches of batch_size, EasyEdit's locality arguments
    editor.hparams.batch_size = 1
    metrics, _, _ = editor.batch_edit(prompts=PROMPTS, subject=SUBJECTS, target_new=TARGETS,
                                      locality_prompts=["The capital of Japan is", "Paris is the capital of"],
                                      locality_ground_truth=["Tokyo", "France"], verbose=False)
    assert len(editor.edits) == 2 and "neighborhood_acc" in metrics[1]["post"]["locality"]
    assert _top1(lm, PROMPTS, TARGETS) == [True, True]


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_sequential_edit_measures_after_all_edits(method, tiny_cache):
    lm = tiny_model("gpt2")
    editor = _editor(lm, method, tiny_cache)
    metrics, _, weights_copy = editor.edit(prompts=PROMPTS, subject=SUBJECTS, target_new=TARGETS,
                                           sequential_edit=True, verbose=False)
    assert len(editor.edits) == 2  # one request per edit, the second on the model with the first
    assert [m["post"]["rewrite_acc"] for m in metrics] == [[1.0], [1.0]]
    assert _top1(lm, PROMPTS, TARGETS) == [True, True]
    # originals are those before the first edit: restoring them undoes both
    fresh = _weights(tiny_model("gpt2"))
    assert all(torch.equal(weights_copy[n], fresh[n]) for n in weights_copy)


def test_easyedit_request_dicts_everywhere(tiny_cache, tmp_path):
    ee = {"prompt": PROMPTS[0], "subject": SUBJECTS[0], "target_new": TARGETS[0], "ground_truth": TRUTHS[0],
          "rephrase_prompt": "We visited the Eiffel Tower", "locality_prompt": "The capital of Japan is",
          "locality_ground_truth": "Tokyo", "portability": {"New Question": "The Eiffel Tower's country is",
                                                            "New Answer": "Italy"}}
    (req,) = as_requests([ee])
    assert req == EditRequest(prompt="Last summer we visited the {}", subject="Eiffel Tower", target_new="Rome",
                              target_true="Paris", case_id=0)
    (tmp_path / "ee.json").write_text(__import__("json").dumps([ee]))
    assert load_requests(tmp_path / "ee.json") == [req]
    # fedit's own forms still work beside it
    assert as_requests([req.to_dict()]) == [req]
    lm = tiny_model("gpt2")
    fedit.edit(lm, [ee], method="rome", overrides={**FAST, "layers": [1]}, resources=resources(tiny_cache))
    assert _top1(lm, PROMPTS[:1], TARGETS[:1]) == [True]
    # the editor reads the probes of the same dict
    lm = tiny_model("gpt2")
    metrics, _, _ = _editor(lm, "rome", tiny_cache).edit(requests=[ee], verbose=False)
    post = metrics[0]["post"]
    assert set(post["locality"]) == {"neighborhood_acc"} and set(post["portability"]) == {"one_hop_acc"}
    assert len(post["rephrase_acc"]) == 1 and post["rewrite_acc"] == [1.0]


def test_subject_missing_from_prompt_is_refused_before_editing(tiny_cache):
    with pytest.raises(RequestError, match="subject 'Eiffel Tower' occurs 0 times in the prompt"):
        as_requests([{"prompt": "The tower is in", "subject": "Eiffel Tower", "target_new": "Rome",
                      "ground_truth": "Paris"}])
    lm = tiny_model("gpt2")
    w0 = _weights(lm)
    editor = _editor(lm, "rome", tiny_cache)
    with pytest.raises(RequestError, match=r"request #1: the subject 'Jordan Michael' occurs 0 times"):
        editor.edit(prompts=PROMPTS, subject=[SUBJECTS[0], "Jordan Michael"], target_new=TARGETS)
    with pytest.raises(RequestError, match="no 'subject' was given"):
        editor.edit(prompts=PROMPTS, target_new=TARGETS)
    with pytest.raises(RequestError, match="one entry per prompt"):
        editor.edit(prompts=PROMPTS, subject=SUBJECTS, target_new=TARGETS[:1])
    with pytest.raises(FeditError, match=r"does not take \['train_ds'\]"):
        editor.edit(prompts=PROMPTS, subject=SUBJECTS, target_new=TARGETS, train_ds=[])
    with pytest.raises(FeditError, match="cannot batch-edit"):
        editor.batch_edit(prompts=PROMPTS, subject=SUBJECTS, target_new=TARGETS)
    assert _same(w0, _weights(lm))


def _yaml(tmp_path, model_dir, extra=""):
    p = tmp_path / "rome.yaml"
    p.write_text(f"""alg_name: "ROME"
model_name: "{model_dir}"
device: "cpu"
stats_dir: "{tmp_path / 'stats'}"
layers: [1]
fact_token: "subject_last"
v_num_grad_steps: 15
v_lr: 5e-1
v_loss_layer: 3
v_weight_decay: 0.5
clamp_norm_factor: 4
kl_factor: 0.0625
mom2_adjustment: true
context_template_length_params: [[4, 5]]
rewrite_module_tmp: "transformer.h.{{}}.mlp.c_proj"
layer_module_tmp: "transformer.h.{{}}"
mlp_module_tmp: "transformer.h.{{}}.mlp"
attn_module_tmp: "transformer.h.{{}}.attn"
ln_f_module: "transformer.ln_f"
lm_head_module: "transformer.wte"
mom2_dataset: "{Path(__file__).parent / 'data' / 'tiny_corpus.txt'}"
mom2_n_samples: 40
mom2_dtype: "float32"
{extra}""")
    return p


def test_easyedit_yaml_file_is_translated_and_edits(tmp_path, tiny_model_dir):
    editor = BaseEditor.from_hparams(str(_yaml(tmp_path, tiny_model_dir, "mom2_seq_len: 32\n")))
    hp = editor.hparams
    assert (hp.alg_name, hp.layers, hp.v_lr, hp.mom2_samples, hp.clamp_norm_factor) == ("rome", [1], 0.5, 40, 4.0)
    assert editor.resources.cache_dir == str(tmp_path / "stats") and editor.resources.corpus.endswith("tiny_corpus.txt")
    metrics, _, _ = editor.edit(prompts=PROMPTS[:1], subject=SUBJECTS[:1], target_new=TARGETS[:1], verbose=False)
    assert metrics[0]["post"]["rewrite_acc"] == [1.0] and metrics[0]["pre"]["rewrite_acc"] == [0.0]
    # load_hparams reads the same file, with a model already loaded
    lm = tiny_model("gpt2")
    assert load_hparams(_yaml(tmp_path, tiny_model_dir, "mom2_seq_len: 32\n"), model=lm).lm is lm


@pytest.mark.parametrize("extra, message", [
    ("v_learning_rate: 0.1\nfoo: 1\n", r"unknown hyperparameter\(s\) \['foo', 'v_learning_rate'\] for fedit's rome"),
    ("fact_token: \"last\"\n", "fact_token 'last' is not supported"),
    ("v_loss_layer: 47\n", "v_loss_layer is 47"),
])
def test_easyedit_yaml_refuses_what_fedit_does_not_know(tmp_path, tiny_model_dir, extra, message):
    p = _yaml(tmp_path, tiny_model_dir)
    text = p.read_text().replace("fact_token: \"subject_last\"\n", "").replace("v_loss_layer: 3\n", "")
    p.write_text(text + extra)
    with pytest.raises(HparamsError, match=message):
        load_hparams(p, model=tiny_model("gpt2"))


def test_easyedit_yaml_module_paths_must_match_the_adapter(tmp_path, tiny_model_dir):
    p = _yaml(tmp_path, tiny_model_dir)
    p.write_text(p.read_text().replace('"transformer.h.{}.mlp.c_proj"', '"model.layers.{}.mlp.down_proj"'))
    with pytest.raises(HparamsError, match="rewrite_module_tmp is 'model.layers.{}.mlp.down_proj', but fedit's "
                                           "adapter for gpt2 models puts that module at 'transformer.h.{}.mlp.c_proj'"):
        load_hparams(p, model=tiny_model("gpt2"))


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_easyedit_examples_read(path):
    lm = tiny_model("gemma3_text", n_layers=18)  # the layout of Gemma 3 270M, tiny
    hp = load_hparams(path, model=lm)
    assert hp.alg_name == path.name.split("-")[0]
    assert hp.layers == ([5] if hp.alg_name == "rome" else [3, 4, 5, 6])
    assert hp.v_lr == (0.02 if hp.alg_name == "pmet" else 0.5) and hp.mom2_samples == 1000


# --- a method the editor has never heard of -----------------------------------------------
class _HookEdit:
    """An edit that changes no weight: a forward hook on the final norm adds a vector."""

    def __init__(self, lm, vec):
        self.lm, self.vec = lm, vec

    def with_originals(self, model):
        return self

    def apply(self, model, check_base=True):
        h = self.lm.adapter.final_norm().register_forward_hook(lambda m, a, out: out + self.vec)
        return _Handle(h)


class _Handle:
    def __init__(self, hook):
        self.hook, self.reverted = hook, False

    def revert(self):
        self.hook.remove()
        self.reverted = True


def _steer(lm, requests, hp, res, state=None):
    """Push the final hidden state towards the first target's unembedding row."""
    from fedit.core.tokens import target_ids

    row = lm.adapter.unembed().weight[target_ids(lm.tokenizer, requests[0].target_new)[0]]
    return EditOutcome(deltas=_HookEdit(lm, 50.0 * row / row.norm()), state=(state or 0) + 1)


def test_a_method_registered_later_works_unchanged(tiny_cache):
    from fedit.methods.rome import RomeHparams

    register(Method("steer-test", RomeHparams, _steer, stateful=True, family="memory-based", batch=False))
    try:
        lm = tiny_model("gpt2")
        w0 = _weights(lm)
        editor = BaseEditor.from_hparams(load_hparams("steer-test", model=lm, layers=[1]),
                                         resources=resources(tiny_cache))
        metrics, _, handles = editor.edit(prompts=PROMPTS, subject=SUBJECTS, target_new=["Rome", "Rome"],
                                          sequential_edit=True, verbose=False)
        assert [m["post"]["rewrite_acc"] for m in metrics] == [[1.0], [1.0]]
        assert len(handles) == 2 and not any(h.reverted for h in handles)  # memory edits: their handles
        for h in reversed(handles):
            h.revert()
        assert _top1(lm, PROMPTS[:1], ["Rome"]) == [False] and _same(w0, _weights(lm))
    finally:
        METHODS.pop("steer-test")


@pytest.mark.slow
def test_rome_on_the_real_model_through_the_editor(all_threads):
    hp = load_hparams("rome", model="gemma-3-270m")
    editor = BaseEditor.from_hparams(hp)
    metrics, _, weights_copy = editor.edit(
        prompts=["The Eiffel Tower is located in the city of"], subject=["Eiffel Tower"], target_new=["Rome"],
        ground_truth=["Paris"], rephrase_prompts=["Where is the Eiffel Tower? It is in the city of"],
        locality_inputs={"neighborhood": {"prompt": ["The capital of Japan is"], "ground_truth": ["Tokyo"]}},
        verbose=False)
    m = metrics[0]
    assert m["post"]["rewrite_acc"] == [1.0] and m["pre"]["rewrite_acc"][0] < 1.0
    assert m["post"]["locality"]["neighborhood_acc"] == [1.0]
    assert list(weights_copy) == [hp.lm.adapter.w_out_param_name(5)]
