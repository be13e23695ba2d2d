"""Settings every test module needs before it imports anything (pytest loads this file first), and shared fixtures."""

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


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads; on a shared machine they only add contention. A module opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.fixture(scope="module")
def conversion_inputs(tmp_path_factory):
    """An official-layout checkpoint file, a tiny SD-style VAE folder (downsampling ×2: 16-px images) and the
    checkpoint's tensors."""
    from safetensors.torch import save_file

    from tests.utils import official_layout_checkpoint, tiny_vae

    root = tmp_path_factory.mktemp("inputs")
    state = official_layout_checkpoint()
    save_file(state, root / "diffit_tiny.safetensors")
    tiny_vae().save_pretrained(root / "vae")
    return root / "diffit_tiny.safetensors", root / "vae", state


@pytest.fixture(scope="session")
def train_assets(tmp_path_factory) -> dict:
    """What the training tests train on: a tiny VAE folder, tiny model configs (`tiny-transformer`, and `tiny-unet`
    with two levels on 8-px images), RGB and grayscale ImageFolders."""
    from tests.utils import tiny_vae, write_config, write_image_folder

    root = tmp_path_factory.mktemp("training")
    tiny_vae().save_pretrained(root / "vae")
    write_config(root / "transformer.json", "tiny-transformer")
    write_config(root / "unet.json", "tiny-unet", sample_size=8, block_out_channels=[16, 32])
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
