import json

import pytest
import torch

from fedit.cli.main import main
from fedit.errors import FeditError

from helpers import run_json, CORPUS, FAST


@pytest.fixture
def model_dir(tiny_model_dir):
    return tiny_model_dir


def _run(capsys, argv):
    return run_json(capsys, main, argv)


def test_edit_save_apply_revert(model_dir, tmp_path, capsys):
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps(FAST))
    common = ["--model", str(model_dir), "--cache-dir", str(tmp_path / "cache"), "--json"]
    code, out = _run(capsys, ["edit", "--method", "rome", "--prompt", "The {} is located in the city of",
                              "--subject", "Eiffel Tower", "--target", "Rome", "--layers", "1", "--hparams", str(hp),
                              "--corpus", str(CORPUS), "--save", str(tmp_path / "e.safetensors"), *common])
    assert code == 0
    assert set(out) >= {"method", "model", "requests"} and out["method"] == "rome"
    (r,) = out["requests"]
    assert set(r) == {"prompt", "subject", "target", "before", "after"}
    assert set(r["before"]) == {"target_prob", "top_token"}
    assert r["after"]["target_prob"] != r["before"]["target_prob"]

    code, out = _run(capsys, ["apply", str(tmp_path / "e.safetensors"), "--out", str(tmp_path / "edited"), *common])
    assert code == 0 and out["requests"][0]["after"]["target_prob"] == pytest.approx(r["after"]["target_prob"], rel=1e-4)
    code, out = _run(capsys, ["revert", str(tmp_path / "e.safetensors"), "--model", str(tmp_path / "edited"),
                              "--out", str(tmp_path / "back"), "--cache-dir", str(tmp_path / "cache"), "--json"])
    assert code == 0
    from safetensors.torch import load_file
    a, b = load_file(str(model_dir / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical after revert


def test_memit_requests_file_and_stats(model_dir, tmp_path, capsys):
    reqs = tmp_path / "r.jsonl"
    reqs.write_text('{"prompt": "{} plays the sport of", "subject": "Michael Jordan", "target_new": "soccer"}\n'
                    '{"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"}\n')
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps(FAST))
    code, out = _run(capsys, ["edit", "--method", "memit", "--requests", str(reqs), "--layers", "1,2", "--hparams",
                              str(hp), "--corpus", str(CORPUS), "--model", str(model_dir), "--cache-dir",
                              str(tmp_path / "c"), "--json"])
    assert code == 0 and len(out["requests"]) == 2
    code, out = _run(capsys, ["stats", "--model", str(model_dir), "--layers", "0,3", "--corpus", str(CORPUS),
                              "--samples", "6", "--seq-len", "16", "--cache-dir", str(tmp_path / "c"), "--json"])
    assert code == 0 and out["layers"] == [0, 3] and set(out["trace"]) == {"0", "3"}


def test_bad_input_exits_2_with_fix(model_dir, tmp_path, capsys):
    code, out = _run(capsys, ["edit", "--prompt", "The tower is in", "--subject", "Eiffel Tower", "--target", "Rome",
                              "--model", str(model_dir), "--json"])
    assert code == 2 and "occurs 0 times" in out["error"] and "Fix:" in out["error"]
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    code, out = _run(capsys, ["apply", str(tmp_path / "bad.safetensors"), "--model", str(model_dir), "--json"])
    assert code == 2 and "not a readable safetensors file" in out["error"]


def test_eval_command_writes_reports(model_dir, tmp_path, capsys):
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({**FAST, "layers": [1, 2]}))
    code, out = _run(capsys, ["eval", "--method", "memit", "--dataset", "counterfact", "--n", "3", "--fluency-n", "1",
                              "--hparams", str(hp), "--corpus", str(CORPUS), "--model", str(model_dir),
                              "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "rep"), "--json"])
    assert code == 0
    assert out["n"] == 3 and out["method"] == "memit" and out["dataset"] == "counterfact"
    for k in ("efficacy_success", "paraphrase_success", "neighborhood_success", "score", "fluency"):
        assert k in out["metrics"] and k in out["metrics_pre"]
    assert (tmp_path / "rep" / "report.md").exists() and (tmp_path / "rep" / "chart.png").exists()
    code, out = _run(capsys, ["eval", "--method", "memit", "--dataset", "zsre", "--n", "2", "--hparams", str(hp),
                              "--corpus", str(CORPUS), "--model", str(model_dir), "--cache-dir", str(tmp_path / "c"),
                              "--out", str(tmp_path / "rep2"), "--json"])
    assert code == 0 and {"efficacy_acc", "paraphrase_acc", "specificity_acc"} <= set(out["metrics"])
    code, out = _run(capsys, ["eval", "--method", "memit", "--dataset", "nope", "--model", str(model_dir),
                              "--out", str(tmp_path / "x"), "--json"])
    assert code == 2 and "nope" in out["error"]


def test_trace_prompt_json_and_png(model_dir, tmp_path, capsys):
    png = tmp_path / "trace.png"
    code, out = _run(capsys, ["trace", "--prompt", "The {} is located in the city of", "--subject", "Eiffel Tower",
                              "--samples", "3", "--window", "2", "--edit-layers", "2", "--out", str(png),
                              "--model", str(model_dir), "--cache-dir", str(tmp_path / "c"), "--json"])
    assert code == 0 and out["mode"] == "prompt" and out["kinds"] == ["hidden", "mlp", "attn"]
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out["out"] == str(png)
    m = out["maps"]["mlp"]
    assert len(m["scores"]) == len(m["tokens"]) and len(m["scores"][0]) == 4  # tokens × layers
    assert m["subject_range"] == [1, 5] and m["window"] == 2 and out["maps"]["hidden"]["window"] is None
    assert set(out["peak"]) == {"hidden", "mlp", "attn"} and {"token", "layer", "effect"} <= set(out["peak"]["mlp"])
    assert len(out["recommendation"]["memit_layers"]) == 2 and out["noise_level"] > 0
    code, out = _run(capsys, ["trace", "--prompt", "The {} is located in", "--subject", "Eiffel Tower", "--kind",
                              "hidden", "--answer", "Paris", "--out", str(png), "--model", str(model_dir),
                              "--cache-dir", str(tmp_path / "c"), "--json"])
    assert code == 0 and list(out["maps"]) == ["hidden"] and out["maps"]["hidden"]["answer"] == " Paris"
    assert "recommendation" not in out


def test_trace_dataset_averages(model_dir, tmp_path, capsys):
    png = tmp_path / "avg.png"
    code, out = _run(capsys, ["trace", "--dataset", "known_1000", "--n", "2", "--include-unknown", "--kind", "mlp",
                              "--samples", "2", "--out", str(png), "--model", str(model_dir),
                              "--cache-dir", str(tmp_path / "c"), "--json"])
    assert code == 0 and out["mode"] == "dataset" and out["n"] == 2 and png.exists()
    m = out["maps"]["mlp"]
    assert m["rows"][2] == "last subject token" and len(m["scores"]) == 6 and m["n"] == 2
    assert "rome_layer" in out["recommendation"]
    code, out = _run(capsys, ["trace", "--subject", "X", "--out", str(png), "--model", str(model_dir), "--json"])
    assert code == 2 and "--prompt" in out["error"]


@pytest.mark.parametrize("method", ["pmet", "alphaedit"])
def test_edit_with_pmet_and_alphaedit(model_dir, tmp_path, capsys, method):
    reqs = tmp_path / "r.jsonl"
    reqs.write_text('{"prompt": "{} plays the sport of", "subject": "Michael Jordan", "target_new": "soccer"}\n'
                    '{"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"}\n')
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({**FAST, "nullspace_threshold": 0.05, "alpha": 0.01} if method == "alphaedit" else FAST))
    code, out = _run(capsys, ["edit", "--method", method, "--requests", str(reqs), "--sequential", "1", "--layers", "1,2",
                              "--hparams", str(hp), "--corpus", str(CORPUS), "--model", str(model_dir),
                              "--save", str(tmp_path / "e.safetensors"), "--cache-dir", str(tmp_path / "c"), "--json"])
    assert code == 0 and out["method"] == method and len(out["requests"]) == 2
    from fedit.deltas import WeightDeltas

    assert WeightDeltas.load(tmp_path / "e.safetensors").method == method


def test_eval_reuses_cached_targets_and_sequential_run_leaves_no_checkpoint(model_dir, tmp_path, capsys):
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({**FAST, "layers": [1, 2]}))
    common = ["--method", "memit", "--dataset", "counterfact", "--n", "2", "--fluency-n", "0", "--hparams", str(hp),
              "--corpus", str(CORPUS), "--model", str(model_dir), "--cache-dir", str(tmp_path / "c"),
              "--target-precision", "bfloat16", "--target-cache", str(tmp_path / "targets"), "--json"]
    for i, expect in enumerate([0, 2]):
        code, out = _run(capsys, ["eval", *common, "--out", str(tmp_path / f"r{i}")])
        assert code == 0
        rep = json.loads((tmp_path / f"r{i}" / "report.json").read_text())
        assert rep["targets_from_cache"] == expect and rep["pre_from_cache"] is (i == 1)  # <cache>/measurements
    code, out = _run(capsys, ["eval", *common, "--batch-size", "1", "--sequential", "--out", str(tmp_path / "s")])
    assert code == 0 and [r["edits"] for r in out["per_batch"]] == [0, 1, 2]
    assert not (tmp_path / "s" / "checkpoint").exists()  # a finished run removes its checkpoint


# --- conventions: one parser per command, help, --version, --json everywhere ----------------

def _leaves(parser, path=()):
    """(argv path, parser) of every command that runs (sub-parsers without sub-commands)."""
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, p in subs[0].choices.items():
        yield from _leaves(p, (*path, name))


def test_every_option_has_help_naming_its_default_and_every_command_takes_json():
    import argparse

    from fedit.cli.main import build_parser

    leaves = list(_leaves(build_parser()))
    assert {" ".join(p) for p, _ in leaves} >= {"edit", "apply", "revert", "stats", "eval", "trace", "datasets", "demo",
                                                "fed run", "fed report", "collab run", "hparams list", "hparams show"}
    for path, p in leaves:
        fmt = p._get_formatter()
        flags = {s for a in p._actions for s in a.option_strings}
        assert "--json" in flags, path
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
                continue
            assert a.help, (path, a.dest)
            text = fmt._expand_help(a)
            if a.option_strings and a.default not in (None, False):
                assert "default" in text.lower() and str(a.default) in text, (path, a.dest, text)


def test_version(capsys):
    from fedit import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"fedit {__version__}"


@pytest.mark.parametrize("argv", [["edit", "--method", "nope"], ["eval", "--dataset", "counterfact"],
                                  ["fed", "run", "--clients", "two", "--out", "x"], ["collab", "run", "--bogus"],
                                  ["datasets", "nope"], ["hparams", "show"], ["trace", "--kind", "x", "--out", "a"],
                                  ["nope"], []])
def test_argument_errors_are_one_json_object_with_exit_2(capsys, argv):
    code, out = _run(capsys, [*argv, "--json"])
    assert code == 2 and out["type"] == "UsageError" and out["exit_code"] == 2
    assert out["problem"] and "--help" in out["fix"]


def test_any_failure_under_json_is_one_json_object(capsys, monkeypatch):
    from fedit.cli import datasets
    from fedit.data.loaders import DatasetError

    monkeypatch.setattr(datasets, "describe", lambda kind: (_ for _ in ()).throw(DatasetError("bad file.", "fix it.")))
    code, out = _run(capsys, ["datasets", "zsre", "--json"])
    assert code == 2 and out == {"error": "bad file. Fix: fix it.", "problem": "bad file.", "fix": "fix it.",
                                 "type": "DatasetError", "exit_code": 2}
    monkeypatch.setattr(datasets, "describe", lambda kind: 1 / 0)
    code, out = _run(capsys, ["datasets", "zsre", "--json"])
    assert code == 1 and out["type"] == "ZeroDivisionError" and out["exit_code"] == 1
    with pytest.raises(ZeroDivisionError):  # without --json: the traceback as usual
        main(["datasets", "zsre"])


def test_argument_errors_without_json_print_usage_on_stderr(capsys):
    assert main(["edit", "--method", "nope"]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.startswith("usage: fedit edit") and "invalid choice: 'nope'" in cap.err


def test_datasets_json_says_where_to_get_every_file(capsys):
    code, out = _run(capsys, ["datasets", "--json"])
    assert code == 0
    kinds = {d["kind"]: d for d in out["datasets"]}
    assert {"counterfact", "zsre", "known_1000", "mquake", "counterfact-easyedit", "wikitext-2"} <= set(kinds)
    assert "counterfact_500.json" in kinds["counterfact"]["instructions"]
    assert kinds["counterfact"]["sample_records"] > 0 and out["provenance"]["fedit"]
    code, out = _run(capsys, ["--json", "datasets", "zsre"])  # --json before the command works too
    assert code == 0 and [d["kind"] for d in out["datasets"]] == ["zsre"]


# --- hyperparameters in the open -------------------------------------------------------------

def test_hparams_list_names_every_registered_method(capsys):
    from fedit.methods import METHODS

    code, out = _run(capsys, ["hparams", "list", "--json"])
    assert code == 0 and [m["name"] for m in out["methods"]] == sorted(METHODS)
    memit = next(m for m in out["methods"] if m["name"] == "memit")
    assert memit["family"] == "locate-then-edit" and memit["description"]
    assert {"gpt2", "gemma-3-270m"} <= set(memit["model_files"]) and memit["capabilities"]["private_mkvs"]


def test_hparams_show_says_where_each_value_came_from(model_dir, tmp_path, capsys):
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({"v_lr": 0.7, "mom2_samples": 11}))
    code, out = _run(capsys, ["hparams", "show", "memit", "--model", str(model_dir), "--hparams", str(hp),
                              "--set", "mom2_samples=12", "--set", "layers=1,2", "--set", "form=base", "--json"])
    assert code == 0
    v, src = out["hparams"], out["sources"]
    assert v["v_lr"] == 0.7 and src["v_lr"] == f"--hparams {hp}"
    assert v["mom2_samples"] == 12 and src["mom2_samples"] == "--set"  # --set wins over the file
    assert v["layers"] == [1, 2] and v["form"] == "base" and src["form"] == "--set"
    assert src["mom2_update_weight"] == "model-type file memit/gpt2.json"  # tiny GPT-2: its model type's file
    assert src["nll_stop"] == "default"
    assert out["provenance"]["model"]["fingerprint"] and out["provenance"]["model"]["model_type"] == "gpt2"
    code, out = _run(capsys, ["hparams", "show", "rome", "--model", str(model_dir), "--json"])
    assert code == 0 and len(out["hparams"]["layers"]) == 1


@pytest.mark.parametrize("item,message", [("v_lrr=0.1", "did you mean v_lr"), ("v_lr=fast", "takes a float"),
                                          ("layers", "KEY=VALUE"), ("mom2_samples=1.5", "takes a int")])
def test_set_refuses_unknown_keys_and_bad_values_before_loading(tmp_path, capsys, item, message):
    code, out = _run(capsys, ["edit", "--prompt", "{} is in", "--subject", "Paris", "--target", "Rome",
                              "--model", str(tmp_path / "no-model-here"), "--set", item, "--json"])
    assert code == 2 and out["type"] == "HparamsError" and message in out["error"]


def test_edit_json_carries_provenance_and_set_values(model_dir, tmp_path, capsys):
    import hashlib

    from fedit import __version__

    reqs = tmp_path / "r.jsonl"
    reqs.write_text('{"prompt": "{} plays the sport of", "subject": "Michael Jordan", "target_new": "soccer"}\n')
    code, out = _run(capsys, ["edit", "--method", "memit", "--requests", str(reqs), "--layers", "1,2",
                              "--set", "mom2_samples=40", "--set", "mom2_seq_len=32", "--set", "v_num_grad_steps=3",
                              "--set", "context_template_length_params=[[4,5]]", "--corpus", str(CORPUS),
                              "--model", str(model_dir), "--cache-dir", str(tmp_path / "c"),
                              "--save", str(tmp_path / "e.safetensors"), "--json"])
    assert code == 0
    prov = out["provenance"]
    assert prov["fedit"] == __version__ and prov["method"] == "memit"
    assert prov["model"]["name"] == str(model_dir) and len(prov["model"]["fingerprint"]) == 16
    assert prov["hparams"]["v_num_grad_steps"] == 3 and prov["hparams_sources"]["v_num_grad_steps"] == "--set"
    assert prov["hparams"]["layers"] == [1, 2] and prov["hparams_sources"]["layers"] == "override"
    assert prov["data"]["sha256"] == hashlib.sha256(reqs.read_bytes()).hexdigest()
    from fedit.deltas import WeightDeltas

    assert WeightDeltas.load(tmp_path / "e.safetensors").hparams["v_num_grad_steps"] == 3  # the edit used --set


def test_eval_report_json_carries_provenance(model_dir, tmp_path, capsys):
    from fedit.data.loaders import sample_path
    from fedit.provenance import sha256_file

    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({**FAST, "layers": [1, 2]}))
    code, out = _run(capsys, ["eval", "--method", "memit", "--dataset", "counterfact", "--n", "1", "--fluency-n", "0",
                              "--hparams", str(hp), "--set", "kl_factor=0.5", "--corpus", str(CORPUS),
                              "--model", str(model_dir), "--cache-dir", str(tmp_path / "c"), "--out",
                              str(tmp_path / "rep"), "--json"])
    assert code == 0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    for prov in (out["provenance"], rep["provenance"]):
        assert prov["hparams"]["kl_factor"] == 0.5 and prov["hparams_sources"]["kl_factor"] == "--set"
        assert prov["data"]["shipped_sample"] and prov["data"]["sha256"] == sha256_file(sample_path("counterfact"))
        assert prov["model"]["fingerprint"] == out["provenance"]["model"]["fingerprint"]
    assert rep["provenance"] == out["provenance"]
    assert "generation_success" in rep["metrics"] and rep["config"]["generation_success"]


def test_eval_without_generation_success(model_dir, tmp_path, capsys):
    """--no-generation-success skips the greedy continuations: the report has every teacher-forced
    measure and says that it left generation_success out."""
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({**FAST, "layers": [1, 2]}))
    code, _ = _run(capsys, ["eval", "--method", "memit", "--dataset", "zsre", "--n", "1", "--fluency-n", "0",
                            "--no-generation-success", "--hparams", str(hp), "--corpus", str(CORPUS),
                            "--model", str(model_dir), "--cache-dir", str(tmp_path / "c"), "--out",
                            str(tmp_path / "rep"), "--json"])
    assert code == 0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["config"]["generation_success"] is False
    assert not any(k.startswith("generation_") for k in {**rep["metrics"], **rep["metrics_pre"]})
    assert {"reliability", "generalization", "locality", "portability"} <= set(rep["metrics"])
    assert "generation_success" not in rep["headline"]
    assert "generation_success" not in (tmp_path / "rep" / "report.md").read_text()


# --- one vocabulary for federated runs -------------------------------------------------------

def test_fed_and_collab_share_flag_names_and_keep_the_old_ones():
    from fedit.cli import collab, fed
    from fedit.cli.main import build_parser
    from fedit.federation.settings import FedSettings

    ap = build_parser()
    new = ap.parse_args(["fed", "run", "--clients", "4", "--rounds", "3", "--records-per-client", "6", "--out", "o"])
    old = ap.parse_args(["fed", "run", "--clients", "4", "--slots", "3", "--n-per-client", "6", "--out", "o"])
    per = ap.parse_args(["fed", "run", "--clients", "4", "--rounds", "3", "--per-client", "2", "--out", "o"])
    s = [fed.settings_from(a) for a in (new, old, per)]
    assert s[0] == s[1] == s[2] and (s[0].clients, s[0].slots, s[0].n_per_client) == (4, 3, 6)
    assert fed.settings_from(ap.parse_args(["fed", "run", "--out", "o"])).n_per_client == FedSettings.n_per_client
    new = ap.parse_args(["collab", "run", "--clients", "4", "--rounds", "2", "--records-per-client", "6", "--out", "o"])
    old = ap.parse_args(["collab", "run", "--clients", "4", "--slots", "2", "--per-client", "3", "--out", "o"])
    assert collab.per_round(new) == collab.per_round(old) == 3 and new.clients == old.clients == 4
    assert collab.per_round(ap.parse_args(["collab", "run", "--rounds", "2", "--out", "o"])) == collab._defaults().per_client
    with pytest.raises(FeditError, match="split evenly"):
        collab.per_round(ap.parse_args(["collab", "run", "--rounds", "2", "--records-per-client", "5", "--out", "o"]))
    code = main(["collab", "run", "--per-client", "2", "--records-per-client", "4", "--out", "o"])
    assert code == 2  # one or the other


def test_fed_run_refuses_a_method_private_mode_cannot_share(capsys):
    code, out = _run(capsys, ["fed", "run", "--method", "alphaedit", "--out", "o", "--json"])
    assert code == 2 and "private mode" in out["error"] and "--mode paper" in out["error"]


def test_no_import_circle_between_cli_modules():
    import ast
    from pathlib import Path

    import fedit.cli

    folder = Path(fedit.cli.__file__).parent
    for f in folder.glob("*.py"):
        if f.name == "main.py":
            continue
        tree = ast.parse(f.read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "fedit.cli.main" not in imported, f.name  # commands never import main


def _documented_commands():
    """Every ``fedit …`` command line in README.md and docs/*.md code blocks (continuations joined)."""
    import re
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        blocks, block = [], None
        for line in doc.read_text().splitlines():
            if line.lstrip().startswith("```"):
                if block is not None:
                    blocks.append("\n".join(block))
                    block = None
                elif line.strip() in ("```bash", "```sh"):
                    block = []
                elif line.strip() != "```":
                    block = None  # another language's block: skipped
                continue
            if block is not None:
                block.append(line)
        for b in blocks:
            for line in b.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip().removeprefix("$ ")
                m = re.search(r"(?:^|; |&& |do )(fedit\s.*?)\s*(?:;|&&|&|$)", line)
                if not m:
                    continue
                cmd = m.group(1).replace("$m", "memit").replace("${m}", "memit")
                cmd = re.sub(r"\$\{?\w+\}?", "1", cmd)  # other shell variables: any value
                yield f"{doc.name}: {cmd}", shlex.split(cmd)[1:]


def test_every_documented_command_parses():
    from fedit.cli.main import build_parser

    cmds = list(_documented_commands())
    assert len(cmds) > 30
    bad = []
    for where, argv in cmds:
        if argv == ["--version"] or "--help" in argv or any(a in ("...", "…") for a in argv):
            continue  # placeholders, not commands
        try:
            build_parser().parse_args(argv)
        except Exception as e:  # noqa: BLE001
            bad.append(f"{where}: {e}")
    assert not bad, "\n".join(bad)


def test_collab_run_takes_set_and_records_provenance(model_dir, tmp_path, capsys):
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({**FAST, "v_lr": 1.0, "clamp_norm_factor": 8.0}))
    code, out = _run(capsys, ["collab", "run", "--engine", "local", "--clients", "2", "--rounds", "1",
                              "--records-per-client", "2", "--merge", "collabedit", "--no-layerwise-reference",
                              "--model", str(model_dir), "--hparams", str(hp), "--layers", "1,2",
                              "--set", "mom2_update_weight=10", "--corpus", str(CORPUS),
                              "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--json"])
    assert code == 0 and out["per_client"] == 2 and out["records_per_client"] == 2
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    for prov in (out["provenance"], rep["provenance"]):
        assert prov["hparams"]["mom2_update_weight"] == 10 and prov["hparams_sources"]["mom2_update_weight"] == "--set"
        assert prov["hparams"]["form"] == "base" and prov["data"]["kind"] == "counterfact"
    assert rep["hparams"]["mom2_update_weight"] == 10  # the run used it


def test_fed_run_provenance_resolves_the_clients_hyperparameters(model_dir, tmp_path):
    from fedit.cli import fed
    from fedit.cli.main import build_parser

    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({"layers": [1, 2], "v_lr": 0.9}))
    args = build_parser().parse_args(["fed", "run", "--model", str(model_dir), "--hparams", str(hp), "--set",
                                      "kl_factor=0.25", "--target-precision", "bfloat16", "--out", str(tmp_path)])
    s = fed.settings_from(args)
    assert s.hparam_overrides() == {"kl_factor": 0.25, "target_precision": "bfloat16"}  # what the clients get
    prov = fed.provenance(s, fed.common.sets_from(args, "memit"))
    src = prov["hparams_sources"]
    assert prov["hparams"]["kl_factor"] == 0.25 and src["kl_factor"] == "--set"
    assert src["target_precision"] == "override" and src["v_lr"] == f"--hparams {hp}"
    assert prov["data"]["shipped_sample"] and prov["model"]["model_type"] == "gpt2"
    args = build_parser().parse_args(["fed", "run", "--model", str(model_dir), "--layers", "99", "--out", str(tmp_path)])
    with pytest.raises(FeditError, match="do not exist"):  # refused before Flower starts
        fed.provenance(fed.settings_from(args))
