"""Small helpers shared by the test modules: tiny models (the named configurations of diffusers_diffit.configs) and
their inputs, tiny pipelines, image folders, loading and running the repository's scripts."""

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from diffusers import AutoencoderKL
from PIL import Image

from benchmarks.space_load import free_port
from diffusers_diffit import DiffiTPipeline, official_scheduler
from diffusers_diffit.configs import model_config


ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CONVERTER = ROOT / "conversion" / "convert_diffit_to_diffusers.py"
SPACE_APP = ROOT / "space_app" / "app.py"


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|, in float64 on the CPU (a and b may live on any device, in any float dtype)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max())


def named_model(name: str, **overrides):
    """The model of a named configuration (`diffusers_diffit.configs`) with config entries replaced, in eval mode."""
    model_class, config = model_config(name)
    return model_class(**{**config, **overrides}).eval()


def write_config(path: Path, name: str, **overrides) -> Path:
    """A named configuration, entries replaced, as a model `config.json` (with its `_class_name`) at `path`."""
    model_class, config = model_config(name)
    path.write_text(json.dumps({"_class_name": model_class.__name__, **config, **overrides}))
    return path


def tiny_transformer(in_channels=4, learned_sigma=True, num_classes=10, seed=0, **overrides):
    """`tiny-transformer` (8×8 latents of `tiny_vae`) seeded, other config entries replaced, with labels that matter
    a lot, so that any guidance slip shows in the final latents."""
    torch.manual_seed(seed)
    out_channels = in_channels * (2 if learned_sigma else 1)
    model = named_model(
        "tiny-transformer", in_channels=in_channels, out_channels=out_channels, num_classes=num_classes, **overrides
    )
    if num_classes:
        torch.nn.init.normal_(model.condition_embed.class_embedder.weight, std=30.0)
    return model


def tiny_transformer_16(**overrides):
    """`tiny-transformer-16` (16×16 latents: an 8×8 token grid, 4 heads of 16)."""
    return named_model("tiny-transformer-16", **overrides)


def tiny_unet(**overrides):
    """`tiny-unet` (16-px, one channel) with a random head: it starts at zero, which would make every output 0."""
    model = named_model("tiny-unet", **overrides)
    torch.nn.init.normal_(model.conv_out.weight, std=0.1)
    return model


def transformer_inputs(batch=3, size=16, classes=10, seed=0):
    """(x [B, 4, size, size], t, y) for `tiny-transformer-16`; the labels include the null class."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=gen)
    t = torch.tensor([0, 999, 437][:batch] + [5] * max(batch - 3, 0))
    y = torch.tensor([classes, 0, 7][:batch] + [1] * max(batch - 3, 0))
    return x, t, y


def unet_inputs():
    """(x [2, 1, 16, 16], c_noise, y) for `tiny_unet`, x from the global generator; the labels include the null class."""
    return torch.randn(2, 1, 16, 16), torch.tensor([0.1, 0.7]), torch.tensor([1, 10])


# Both DiffiT models at test size with inputs: kind -> () -> (model, (x, t, y))
TINY_MODELS = {
    "transformer": lambda: (tiny_transformer_16(), transformer_inputs()),
    "unet": lambda: (tiny_unet(), unet_inputs()),
}


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


# The official-layout checkpoint of `official_layout_checkpoint`: latent side 8 -> a 4×4 token grid
DIM, HEADS, DEPTH, PATCH, SIDE, CLASSES = 16, 2, 2, 2, 8, 1000


def official_layout_checkpoint(seed=0) -> dict[str, torch.Tensor]:
    """Random tensors under the released checkpoints' key names and shapes (a DiT-like layout: `blocks.{i}.attn.qkv`,
    `qkv_temb`, `relative_position_bias_table`, ...), the derived tensors included."""
    g = torch.Generator().manual_seed(seed)
    grid, tokens = SIDE // PATCH, (SIDE // PATCH) ** 2

    def randn(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    # MAE sin-cos table: first half of the channels encodes the column, second half the row; [sin, cos] each
    omega = 1.0 / 10000 ** (torch.arange(DIM // 4, dtype=torch.float64) / (DIM / 4))
    rows, cols = torch.arange(tokens) // grid, torch.arange(tokens) % grid
    angles = [pos[:, None].double() * omega for pos in (cols, rows)]
    pos_embed = torch.cat([torch.cat([a.sin(), a.cos()], 1) for a in angles], 1).float()[None]
    # Swin index: (Δrow + w − 1)·(2w − 1) + Δcol + w − 1
    d_row, d_col = rows[:, None] - rows[None], cols[:, None] - cols[None]
    index = (d_row + grid - 1) * (2 * grid - 1) + d_col + grid - 1

    state = {
        "pos_embed": pos_embed,
        "x_embedder.proj.weight": randn(DIM, 4, PATCH, PATCH),
        "x_embedder.proj.bias": randn(DIM),
        "t_embedder.mlp.0.weight": randn(DIM, 256),
        "t_embedder.mlp.0.bias": randn(DIM),
        "t_embedder.mlp.2.weight": randn(DIM, DIM),
        "t_embedder.mlp.2.bias": randn(DIM),
        "y_embedder.embedding_table.weight": randn(CLASSES + 1, DIM),
        "final_layer.linear.weight": randn(PATCH * PATCH * 8, DIM),
        "final_layer.linear.bias": randn(PATCH * PATCH * 8),
    }
    for i in range(DEPTH):
        state |= {
            f"blocks.{i}.attn.qkv.weight": randn(3 * DIM, DIM),
            f"blocks.{i}.attn.qkv.bias": randn(3 * DIM),
            f"blocks.{i}.attn.qkv_temb.weight": randn(3 * DIM, DIM),
            f"blocks.{i}.attn.qkv_temb.bias": randn(3 * DIM),
            f"blocks.{i}.attn.proj.weight": randn(DIM, DIM),
            f"blocks.{i}.attn.proj.bias": randn(DIM),
            f"blocks.{i}.attn.relative_position_bias_table": randn((2 * grid - 1) ** 2, HEADS),
            f"blocks.{i}.attn.relative_position_index": index.clone(),
            f"blocks.{i}.mlp.fc1.weight": randn(4 * DIM, DIM),
            f"blocks.{i}.mlp.fc1.bias": randn(4 * DIM),
            f"blocks.{i}.mlp.fc2.weight": randn(DIM, 4 * DIM),
            f"blocks.{i}.mlp.fc2.bias": randn(DIM),
        }
    return state


def make_pipe(transformer=None, scheduler=None, vae="tiny", **config) -> DiffiTPipeline:
    """A DiffiTPipeline of `tiny_transformer`, NVIDIA's DDPM scheduler and `tiny_vae` unless given, no progress bar."""
    pipe = DiffiTPipeline(
        transformer or tiny_transformer(),
        scheduler or official_scheduler(),
        vae=tiny_vae() if vae == "tiny" else vae,
        **config,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


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


def load_script(path: Path, name: str | None = None):
    """A script of the repository (examples/, conversion/ and space_app/ are not packages) as a module, without
    running its `main`."""
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_example(name: str):
    """An examples/ script as a module (its `main(argv)` and helpers)."""
    return load_script(EXAMPLES / f"{name}.py")


def load_app():
    return load_script(SPACE_APP, "space_app_main")


def shipped_models(app):
    """What the Space serves with nothing configured: both models shipped in the package."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("DIFFIT_MODEL", raising=False)
        patch.setattr(app, "SPACE_CONFIG", app.HERE / "no-space-config.json")
        return app.load_pipelines()


@contextlib.contextmanager
def served_demo(app, **launch_kwargs):
    """The Space of the shipped models, launched on a free 127.0.0.1 port: yields (demo, url, models)."""
    models = shipped_models(app)
    demo = app.build_demo(models)
    port = free_port()
    app.launch(
        demo,
        server_name="127.0.0.1",
        server_port=port,
        prevent_thread_lock=True,
        quiet=True,
        share=False,
        **launch_kwargs,
    )
    try:
        yield demo, f"http://127.0.0.1:{port}/", models
    finally:
        demo.close()


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


def run_isolated_python(*argv: str, cwd: Path) -> str:
    """`python -I ARGV` in `cwd`, offline with an empty HF_HOME there: it sees neither this checkout nor
    PYTHONPATH nor the user's cache, only what is installed, as a plain-diffusers user would. Returns its stdout."""
    env = {**os.environ, "HF_HOME": str(cwd / "hf_home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-I", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout
