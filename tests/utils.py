"""Small helpers shared by the test modules: tiny components, image folders, running the example scripts."""

import importlib.util
from pathlib import Path

import numpy as np
import torch
from accelerate.state import AcceleratorState, GradientState
from diffusers import AutoencoderKL
from PIL import Image


ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|, in float64 on the CPU (a and b may live on any device, in any float dtype)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max())


# A latent DiffiT with learned variance on the 8×8 latents of `tiny_vae` (16-px images).
TINY_TRANSFORMER = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    out_channels=8,
    num_layers=2,
    num_attention_heads=2,
    attention_head_dim=8,
)


def tiny_vae(channels: int = 3) -> AutoencoderKL:
    """An SD-style `AutoencoderKL` with 4 latent channels that downsamples ×2 (16-px images of `channels` channels
    <-> 8×8 latents)."""
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).eval()


def write_image_folder(root: Path, classes: list[str], per_class: int, size=(20, 24), mode="RGB", seed=0) -> Path:
    """An ImageFolder of random 8-bit images, one sub-folder per class, each class in its own brightness band."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size[0], size[1], 3) if mode == "RGB" else size
            pixels = (rng.random(shape) * 60 + c * 70).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def load_example(name: str):
    """An examples/ script as a module (its `main(argv)` and helpers), without running it."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reset_accelerate():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_in_process(module, argv: list):
    """Run an example's `main(argv)` here, with one thread (as the subprocess runs do) and fresh accelerate state."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    reset_accelerate()
    try:
        module.main([str(a) for a in argv])
    finally:
        reset_accelerate()
        torch.set_num_threads(threads)
