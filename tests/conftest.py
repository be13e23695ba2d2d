import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the network

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers.models.attention_dispatch import _AttentionBackendRegistry  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_attention_backend():
    """`set_attention_backend` also changes diffusers' process-wide default, which `reset_attention_backend` leaves:
    without this, one test's CUDA-only backend would reach the next test's models."""
    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry._active_backend = active


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
