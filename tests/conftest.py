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


@pytest.fixture
def all_threads():
    """For tests on the real model: use every core while the test runs."""
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(1)
