import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models are dominated by threading overhead: one thread is ~10-40x faster for them.
torch.set_num_threads(1)


@pytest.fixture
def tiny_cache(tmp_path_factory):
    """A cache folder shared by the tests of one session (statistics of tiny models)."""
    return str(tmp_path_factory.getbasetemp() / "fedit-cache")


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory):
    """``folder(kind)``: a tiny random model of ``kind`` saved as a model folder (loadable with
    --model), made once per kind and shared by the session."""
    from fedit.testing import tiny_model

    made = {}

    def folder(kind: str):
        if kind not in made:
            d = tmp_path_factory.mktemp(f"tiny-{kind}")
            lm = tiny_model(kind)
            lm.model.save_pretrained(d)
            lm.tokenizer.save_pretrained(d)
            made[kind] = d
        return made[kind]

    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_folder):
    """A tiny random GPT-2 saved as a model folder (loadable with --model), shared by the session."""
    return tiny_model_folder("gpt2")


@pytest.fixture
def all_threads():
    """For tests on the real model: use every core while the test runs."""
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(1)
