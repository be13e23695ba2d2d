"""Settings every test module needs before it imports anything (pytest loads this file first), and shared fixtures."""

import json
import os
import tempfile


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the network
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="gradio-"))  # one per test run: parallel runs collide
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")  # the Space tests talk to a local server

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


@pytest.fixture(scope="session")
def train_assets(tmp_path_factory) -> dict:
    """What the training tests train on: a tiny VAE folder, tiny model configs, RGB and grayscale ImageFolders."""
    from tests.utils import TINY_TRANSFORMER, tiny_vae, write_image_folder

    root = tmp_path_factory.mktemp("training")
    tiny_vae().save_pretrained(root / "vae")
    transformer = dict(_class_name="DiffiTTransformer2DModel", **TINY_TRANSFORMER)
    unet = dict(
        _class_name="DiffiTUNet2DModel",
        sample_size=8,
        in_channels=1,
        block_out_channels=[16, 32],
        layers_per_block=1,
        window_size=4,
        attention_head_dim=8,
        time_embedding_dim=32,
        norm_num_groups=4,
    )
    (root / "transformer.json").write_text(json.dumps(transformer))
    (root / "unet.json").write_text(json.dumps(unet))
    write_image_folder(root / "rgb", ["cat", "dog", "fish"], per_class=4)
    write_image_folder(root / "gray", ["0", "1"], per_class=4, size=(8, 8), mode="L")
    return {
        "root": root,
        "vae": root / "vae",
        "transformer": root / "transformer.json",
        "unet": root / "unet.json",
        "rgb": root / "rgb",
        "gray": root / "gray",
    }
