"""Training: the hybrid loss against the DDPM equations and diffusers' scheduler, the label-table rule, crash-safe
checkpoints, seeded data and latent caching, and examples/train_diffit.py end to end (one run per model kind,
fine-tuning, loss decrease, kill-and-resume equivalence, two processes) plus examples/sample_fid.py."""

import importlib.util
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from diffusers import AutoencoderKL, DDPMScheduler
from PIL import Image
from safetensors.torch import load_file

from diffusers_diffit import DiffiTTransformer2DModel, DiffiTUNet2DModel
from diffusers_diffit.edm import edm_loss
from diffusers_diffit.pipelines import DiffiTPipeline
from diffusers_diffit.training import (
    CheckpointManager,
    EpochSampler,
    HybridDiffusionLoss,
    ImageDataset,
    LatentDataset,
    default_class_map,
    derive_seed,
    preprocess_image,
    resize_class_embedding,
)


ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_diffit = _load_script("train_diffit")
precompute_latents = _load_script("precompute_latents")
sample_fid = _load_script("sample_fid")


def _reset_accelerate():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_in_process(module, argv: list[str]):
    """Run an example's `main(argv)` here, with one thread (as the subprocess runs do) and fresh accelerate state."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _reset_accelerate()
    try:
        module.main([str(a) for a in argv])
    finally:
        _reset_accelerate()
        torch.set_num_threads(threads)


def tiny_transformer(**overrides) -> DiffiTTransformer2DModel:
    config = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2, num_attention_heads=2,
                  attention_head_dim=8, num_classes=5, class_dropout_prob=0.0)
    return DiffiTTransformer2DModel(**{**config, **overrides})


# ------------------------------------------------------------------------------------------------------------------
# fixtures: a tiny VAE, ImageFolders, tiny model configs
# ------------------------------------------------------------------------------------------------------------------


def write_image_folder(root: Path, classes: list[str], per_class: int, size=(20, 24), mode="RGB", seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size[0], size[1], 3) if mode == "RGB" else size
            pixels = (rng.random(shape) * 60 + c * 70).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("training")
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        sample_size=16,
    )
    vae.save_pretrained(root / "vae")
    transformer = dict(_class_name="DiffiTTransformer2DModel", sample_size=8, patch_size=2, in_channels=4,
                       out_channels=8, num_layers=2, num_attention_heads=2, attention_head_dim=8)
    unet = dict(_class_name="DiffiTUNet2DModel", sample_size=8, in_channels=1, block_out_channels=[16, 32],
                layers_per_block=1, window_size=4, attention_head_dim=8, time_embedding_dim=32, norm_num_groups=4)
    (root / "transformer.json").write_text(json.dumps(transformer))
    (root / "unet.json").write_text(json.dumps(unet))
    write_image_folder(root / "rgb", ["cat", "dog", "fish"], per_class=4)
    write_image_folder(root / "gray", ["0", "1"], per_class=4, size=(8, 8), mode="L")
    return {"root": root, "vae": root / "vae", "transformer": root / "transformer.json", "unet": root / "unet.json",
            "rgb": root / "rgb", "gray": root / "gray"}


def latent_args(work, output_dir, *extra) -> list:
    return ["--model_config_name_or_path", work["transformer"], "--vae", work["vae"], "--train_data_dir",
            work["rgb"], "--output_dir", output_dir, "--train_batch_size", 4, "--report_to", "none", *extra]


@pytest.fixture(scope="module")
def latent_run(work) -> Path:
    """One latent run (EMA, flips, validation grid) reused by the fine-tuning tests."""
    out = work["root"] / "latent-run"
    run_in_process(train_diffit, latent_args(work, out, "--max_train_steps", 4, "--checkpointing_steps", 2,
                                             "--use_ema", "--random_flip", "--validation_steps", 4,
                                             "--validation_inference_steps", 2))
    return out


# ------------------------------------------------------------------------------------------------------------------
# the hybrid loss
# ------------------------------------------------------------------------------------------------------------------


def reference_hybrid_terms(out, x0, x_t, noise, t, scheduler):
    """L_simple and L_vlb from Ho et al. (eq. 7 posterior, eq. 15 x̂_0, §3.3 decoder) in float64, the model's log
    variance from diffusers' own `DDPMScheduler._get_variance("learned_range")` (t > 0), KL from torch.distributions."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)
    c = x0.shape[1]
    out, x0, x_t, noise = (a.double() for a in (out, x0, x_t, noise))
    mse, vlb = [], []
    for i, ti in enumerate(t.tolist()):
        eps, v = out[i, :c], out[i, c:]
        ab, beta = alpha_bar[ti], betas[ti]
        ab_prev = alpha_bar[ti - 1] if ti > 0 else torch.tensor(1.0, dtype=torch.float64)

        def posterior_mean(start):
            return ab_prev.sqrt() * beta / (1 - ab) * start + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab) * x_t[i]

        x0_hat = (x_t[i] - (1 - ab).sqrt() * eps) / ab.sqrt()
        model_mean = posterior_mean(x0_hat)
        beta_tilde_1 = (1 - alpha_bar[0]) / (1 - alpha_bar[1]) * betas[1]
        if ti > 0:
            log_var = scheduler._get_variance(ti, predicted_variance=v.float()).double()
            true = torch.distributions.Normal(posterior_mean(x0[i]), ((1 - ab_prev) / (1 - ab) * beta).sqrt())
            model = torch.distributions.Normal(model_mean, (0.5 * log_var).exp())
            vlb.append(torch.distributions.kl_divergence(true, model).mean() / math.log(2))
        else:
            frac = (v + 1) / 2
            log_var = frac * beta.log() + (1 - frac) * beta_tilde_1.log()
            model = torch.distributions.Normal(model_mean, (0.5 * log_var).exp())
            upper = torch.where(x0[i] > 0.999, torch.ones_like(x0[i]), model.cdf(x0[i] + 1 / 255))
            lower = torch.where(x0[i] < -0.999, torch.zeros_like(x0[i]), model.cdf(x0[i] - 1 / 255))
            vlb.append(-(upper - lower).clamp(min=1e-12).log().mean() / math.log(2))  # ADM's probability floor
        mse.append(((noise[i] - eps) ** 2).mean())
    return torch.stack(mse), torch.stack(vlb)


def test_hybrid_loss_matches_the_ddpm_equations():
    scheduler = DDPMScheduler(beta_schedule="linear", variance_type="learned_range", clip_sample=False)
    gen = torch.Generator().manual_seed(1)
    x0 = (torch.randint(0, 256, (5, 3, 4, 4), generator=gen) / 127.5 - 1).float()  # 8-bit data, incl. ±1 edges
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([0, 0, 1, 500, 999])
    x_t = scheduler.add_noise(x0, noise, t)
    out = torch.cat([torch.randn(x0.shape, generator=gen), torch.rand(x0.shape, generator=gen) * 2 - 1], dim=1)
    out[0, :3] = noise[0] + 0.01 * torch.randn(x0[0].shape, generator=gen)  # a good ε̂ at t = 0: a sharp decoder

    terms = HybridDiffusionLoss(scheduler)(out, x0, x_t, noise, t)
    mse, vlb = reference_hybrid_terms(out, x0, x_t, noise, t, scheduler)
    torch.testing.assert_close(terms["mse"].double(), mse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["vlb"].double(), vlb, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vlb"])  # λ = 1000 / 1000


def test_hybrid_loss_trains_the_variance_only_through_the_vlb():
    scheduler = DDPMScheduler(beta_schedule="linear")
    x0, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = torch.tensor([0, 10, 900])
    x_t = scheduler.add_noise(x0, noise, t)
    out = torch.randn(3, 8, 4, 4, requires_grad=True)
    terms = HybridDiffusionLoss(scheduler)(out, x0, x_t, noise, t)
    (grad_vlb,) = torch.autograd.grad(terms["vlb"].sum(), out, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert grad_vlb[:, :4].abs().max() == 0 and grad_vlb[:, 4:].abs().max() > 0  # ε̂ detached in L_vlb
    assert grad_mse[:, 4:].abs().max() == 0 and grad_mse[:, :4].abs().max() > 0


def test_hybrid_loss_weighting_and_shapes():
    scheduler = DDPMScheduler(num_train_timesteps=4000, beta_schedule="linear")
    x0, noise, t = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.tensor([3, 3000])
    x_t = scheduler.add_noise(x0, noise, t)
    loss = HybridDiffusionLoss(scheduler)
    terms = loss(torch.randn(2, 8, 2, 2), x0, x_t, noise, t)
    torch.testing.assert_close(terms["loss"], terms["mse"] + 4.0 * terms["vlb"])  # ADM: λ = T / 1000
    eps_only = loss(torch.randn(2, 4, 2, 2), x0, x_t, noise, t)  # no variance channels: L_simple only
    assert eps_only["vlb"].abs().max() == 0 and torch.equal(eps_only["loss"], eps_only["mse"])
    with pytest.raises(ValueError, match="model_output"):
        loss(torch.randn(2, 6, 2, 2), x0, x_t, noise, t)


# ------------------------------------------------------------------------------------------------------------------
# label table
# ------------------------------------------------------------------------------------------------------------------


def _eps(model, x, t, labels):
    return model(x, t, class_labels=labels).sample


@torch.no_grad()
def test_resize_class_embedding_keeps_rows_moves_null_and_starts_new_classes_unconditional():
    torch.manual_seed(0)
    model = tiny_transformer(num_classes=5).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    before = {y: _eps(model, x, t, torch.tensor([y, y])) for y in range(6)}  # 5 = null
    old_table = model.condition_embed.class_embedder.weight.clone()

    resize_class_embedding(model, 7, class_map=[3, None, 0, None, None, 4, 1])
    table = model.condition_embed.class_embedder.weight
    assert table.shape == (8, old_table.shape[1]) and model.config.num_classes == 7
    for new, old in {0: 3, 2: 0, 5: 4, 6: 1, 1: 5, 3: 5, 4: 5, 7: 5}.items():  # new classes & null <- old null row
        torch.testing.assert_close(table[new], old_table[old], rtol=0, atol=0)
    torch.testing.assert_close(_eps(model, x, t, torch.tensor([0, 0])), before[3])
    torch.testing.assert_close(_eps(model, x, t, torch.tensor([1, 1])), before[5])  # new class = old unconditional
    torch.testing.assert_close(_eps(model, x, t, None), before[5])  # null class


@torch.no_grad()
def test_resize_to_unconditional_preserves_the_unconditional_function(tmp_path):
    torch.manual_seed(0)
    model = tiny_transformer(num_classes=5).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 999])
    expected = _eps(model, x, t, None)
    resize_class_embedding(model, 0)
    assert model.condition_embed.class_embedder is None and model.config.num_classes == 0
    torch.testing.assert_close(_eps(model, x, t, None), expected, rtol=1e-5, atol=1e-6)
    model.save_pretrained(tmp_path)  # the config follows: it reloads as an unconditional model
    reloaded = DiffiTTransformer2DModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_eps(reloaded, x, t, None), expected, rtol=1e-5, atol=1e-6)

    resize_class_embedding(model, 3)  # and back: every class starts as the unconditional model
    for y in range(4):
        torch.testing.assert_close(_eps(model, x, t, torch.tensor([y, y])), expected, rtol=1e-5, atol=1e-6)


def test_resize_class_embedding_rejects_bad_maps():
    model = tiny_transformer(num_classes=5)
    with pytest.raises(ValueError, match="num_classes"):
        resize_class_embedding(model, -1)
    with pytest.raises(ValueError, match="one entry per new class"):
        resize_class_embedding(model, 3, class_map=[0, 1])
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        resize_class_embedding(model, 2, class_map=[0, 5])  # 5 is the null row, not a class


def test_default_class_map_by_name_then_by_id():
    id2label = {0: ["tench", "Tinca tinca"], 1: "goldfish", 2: ["crane"], 3: ["crane"]}
    names = ["Goldfish", "tinca tinca", "zebra", "crane", "tench, Tinca tinca"]
    assert default_class_map(names, id2label, 4, 5) == [1, 0, None, None, 0]  # ambiguous "crane" -> new class
    assert default_class_map(names, None, 4, 5) == [0, 1, 2, 3, None]
    assert default_class_map(None, id2label, 4, 2) == [0, 1]


# ------------------------------------------------------------------------------------------------------------------
# checkpoints, randomness, data
# ------------------------------------------------------------------------------------------------------------------


def test_checkpoint_manager_is_crash_safe_and_keeps_the_limit(tmp_path):
    _reset_accelerate()
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    manager = CheckpointManager(tmp_path, accelerator, total_limit=2)
    for step in (1, 2, 3):
        manager.save(step)
    assert [s for s, _ in manager.complete()] == [2, 3]
    assert manager.latest() == tmp_path / "checkpoint-3" and CheckpointManager.step_of(manager.latest()) == 3
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".trash-*"))

    (tmp_path / "checkpoint-9").mkdir()  # a folder without the marker (e.g. copied half-way) is never picked
    (tmp_path / ".tmp-checkpoint-10").mkdir()  # what a kill during `save` leaves
    assert manager.latest() == tmp_path / "checkpoint-3"
    manager.remove_partial()
    assert not (tmp_path / ".tmp-checkpoint-10").exists() and (tmp_path / "checkpoint-9").exists()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        manager.resolve(str(tmp_path / "checkpoint-9"))
    assert manager.resolve("latest") == tmp_path / "checkpoint-3"
    assert CheckpointManager(tmp_path / "none", accelerator).resolve("latest") is None
    with pytest.raises(ValueError, match="total_limit"):
        CheckpointManager(tmp_path, accelerator, total_limit=0)
    _reset_accelerate()


def test_derive_seed_and_epoch_sampler_are_pure_functions():
    assert derive_seed(0, 5, 1, 0) == derive_seed(0, 5, 1, 0)
    assert len({derive_seed(0, s, m, p) for s in range(20) for m in range(3) for p in range(2)}) == 120
    with pytest.raises(ValueError, match="non-negative"):
        derive_seed(0, -1)
    sampler = EpochSampler(10, seed=3)
    first = list(sampler)
    assert sorted(i for i, _ in first) == list(range(10)) and first == list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first and list(EpochSampler(10, seed=4)) != first
    assert [i for i, _ in EpochSampler(4, seed=3, shuffle=False)] == [0, 1, 2, 3]


def test_image_dataset_from_folder_labels_and_seeded_augmentation(work, tmp_path):
    data = ImageDataset.from_folder(work["rgb"], 16, random_flip=True)
    assert data.classes == ["cat", "dog", "fish"] and data.labels == [0] * 4 + [1] * 4 + [2] * 4
    item = data[(5, 123)]
    assert item["pixel_values"].shape == (3, 16, 16) and item["class_labels"] == 1
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    torch.testing.assert_close(data[(5, 123)]["pixel_values"], item["pixel_values"], rtol=0, atol=0)
    views = {data[(5, s)]["pixel_values"].sum().item() for s in range(12)}  # random crops / flips vary by seed
    assert len(views) > 1
    plain = data[5]["pixel_values"]  # an index alone: centre crop, no flip
    centred = preprocess_image(Image.open(work["rgb"] / "dog" / "1.png"), 16)
    torch.testing.assert_close(plain, centred)

    gray = ImageDataset.from_folder(work["gray"], 8, channels=1)
    assert gray[0]["pixel_values"].shape == (1, 8, 8)
    flat = write_image_folder(tmp_path / "flat", ["x"], 2) / "x"
    assert ImageDataset.from_folder(flat, 8).classes is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        ImageDataset.from_folder(tmp_path / "empty", 8)
    with pytest.raises(ValueError, match="channels"):
        preprocess_image(Image.open(work["rgb"] / "dog" / "1.png"), 8, channels=2)


def test_preprocess_image_resizes_short_side_and_centre_crops():
    pixels = np.zeros((40, 80), dtype=np.uint8)
    pixels[:, 30:50] = 255  # a white band in the middle of a wide image
    out = preprocess_image(Image.fromarray(pixels), 10, channels=1)
    assert out.shape == (1, 10, 10)
    assert out[0, :, 5].min() > 0.9 and out[0, :, 0].max() < -0.9  # centre kept, sides cropped away


def test_precompute_latents_stores_vae_moments_and_resumes(work, tmp_path):
    out = tmp_path / "latents"
    argv = ["--vae", work["vae"], "--train_data_dir", work["rgb"], "--resolution", 16, "--flip", "--output_dir", out,
            "--shard_size", 5, "--batch_size", 3]
    run_in_process(precompute_latents, argv)
    data = LatentDataset(out, random_flip=True)
    assert len(data) == 12 and data.classes == ["cat", "dog", "fish"] and len(data.shards) == 3

    vae = AutoencoderKL.from_pretrained(work["vae"])
    images = ImageDataset.from_folder(work["rgb"], 16, center_crop=True)
    with torch.no_grad():
        pixels = images[7]["pixel_values"][None]
        expected = vae.encode(pixels).latent_dist.parameters[0]
        expected_flipped = vae.encode(pixels.flip(-1)).latent_dist.parameters[0]
    seen = {tuple(data[(7, s)]["moments"].flatten()[:3].tolist()) for s in range(16)}
    torch.testing.assert_close(LatentDataset(out)[7]["moments"], expected, rtol=1e-5, atol=1e-5)
    assert LatentDataset(out)[7]["class_labels"] == 1 and len(seen) == 2
    flipped = [data[(7, s)]["moments"] for s in range(16)]
    assert any(torch.allclose(m, expected_flipped, rtol=1e-5, atol=1e-5) for m in flipped)

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    run_in_process(precompute_latents, argv)  # finished shards are skipped
    assert {p: p.stat().st_mtime_ns for p in out.glob("shard-*")} == stamps
    with pytest.raises(ValueError, match="other settings"):
        run_in_process(precompute_latents, argv[:-4] + ["--shard_size", 5, "--batch_size", 3, "--dtype", "float16"])
    no_flip = tmp_path / "no-flip"
    run_in_process(precompute_latents, ["--vae", work["vae"], "--train_data_dir", work["gray"], "--resolution", 16,
                                        "--output_dir", no_flip])
    with pytest.raises(ValueError, match="without --flip"):
        LatentDataset(no_flip, random_flip=True)


# ------------------------------------------------------------------------------------------------------------------
# train_diffit.py end to end
# ------------------------------------------------------------------------------------------------------------------


def test_latent_run_writes_a_pipeline_that_loads_and_samples(latent_run):
    index = json.loads((latent_run / "model_index.json").read_text())
    assert index["id2label"] == {"0": ["cat"], "1": ["dog"], "2": ["fish"]}
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert (latent_run / "samples" / "step-0000004.png").is_file()  # the validation grid
    card = (latent_run / "README.md").read_text()
    assert "library_name: diffusers" in card and "DiffiTPipeline.from_pretrained" in card
    assert [p.name for p in sorted(latent_run.glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-4"]

    # the saved transformer holds the EMA weights of the last step
    ema = load_file(latent_run / "checkpoint-4" / "model_ema" / "diffusion_pytorch_model.safetensors")
    final = load_file(latent_run / "transformer" / "diffusion_pytorch_model.safetensors")
    raw = load_file(latent_run / "checkpoint-4" / "model" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(final[k], ema[k]) for k in final) and any(not torch.equal(final[k], raw[k]) for k in final)

    pipe = DiffiTPipeline.from_pretrained(latent_run)
    scheduler = pipe.scheduler.config
    assert scheduler.variance_type == "learned_range" and scheduler.timestep_spacing == "linspace"
    images = pipe(class_labels=["dog", 0], num_inference_steps=2, generator=torch.manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


def test_image_space_unet_trains_with_edm_and_loads(work):
    out = work["root"] / "unet-run"
    run_in_process(train_diffit, ["--model_config_name_or_path", work["unet"], "--train_data_dir", work["gray"],
                                  "--output_dir", out, "--train_batch_size", 4, "--max_train_steps", 3,
                                  "--checkpointing_steps", 3, "--report_to", "none", "--use_ema",
                                  "--mixed_precision", "bf16", "--gradient_checkpointing"])
    pipe = DiffiTPipeline.from_pretrained(out)
    assert type(pipe.scheduler).__name__ == "EDMHeunScheduler" and pipe.vae is None
    assert pipe.transformer.config.num_classes == 2 and pipe.config.num_inference_steps == 18
    images = pipe(class_labels=[0, 1], num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


def test_cached_latents_train_exactly_like_encoding_on_the_fly(work, tmp_path):
    latents = tmp_path / "latents"
    run_in_process(precompute_latents, ["--vae", work["vae"], "--train_data_dir", work["rgb"], "--resolution", 16,
                                        "--output_dir", latents])
    common = ["--model_config_name_or_path", work["transformer"], "--train_batch_size", 4, "--max_train_steps", 3,
              "--checkpointing_steps", 100, "--report_to", "none", "--learning_rate", 1e-3]
    run_in_process(train_diffit, [*common, "--latents_dir", latents, "--output_dir", tmp_path / "cached",
                                  "--dataloader_num_workers", 2])  # workers reopen the shards; order is unchanged
    run_in_process(train_diffit, [*common, "--train_data_dir", work["rgb"], "--center_crop", "--vae", work["vae"],
                                  "--output_dir", tmp_path / "images"])
    cached = load_file(tmp_path / "cached" / "transformer" / "diffusion_pytorch_model.safetensors")
    images = load_file(tmp_path / "images" / "transformer" / "diffusion_pytorch_model.safetensors")
    start = tiny_transformer(num_classes=3).state_dict()
    assert any(not torch.allclose(cached[k], start[k]) for k in cached)  # it trained
    # Same data, same noise; only the VAE's batch size differs, so the latents differ in the last bits, which Adam
    # can amplify for a parameter whose gradient is near zero (it normalises every gradient). The two runs must
    # agree far better than either moved: within 1e-5 on this CPU's default kernels, 1.1e-4 on AVX2 kernels with one
    # thread, against a training movement of ~3e-3 (lr 1e-3, 3 steps).
    moved = max((cached[k] - start[k]).abs().max().item() for k in cached)
    worst = max((cached[k] - images[k]).abs().max().item() for k in cached)
    assert worst <= 0.1 * moved, (worst, moved)
    # the VAE a latents folder was made with is the pipeline's VAE
    assert DiffiTPipeline.from_pretrained(tmp_path / "cached").vae is not None


def test_finetuning_with_other_classes_applies_the_label_rule(work, latent_run, tmp_path):
    data = write_image_folder(tmp_path / "data", ["bird", "dog"], per_class=2)
    out = tmp_path / "finetuned"
    run_in_process(train_diffit, ["--pretrained_model_name_or_path", latent_run, "--train_data_dir", data,
                                  "--output_dir", out, "--train_batch_size", 2, "--max_train_steps", 1,
                                  "--learning_rate", 0, "--report_to", "none", "--checkpointing_steps", 100])
    base = load_file(latent_run / "transformer" / "diffusion_pytorch_model.safetensors")
    tuned = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    key = "condition_embed.class_embedder.weight"
    assert tuned[key].shape[0] == 3
    torch.testing.assert_close(tuned[key][1], base[key][1])  # "dog" keeps its row (old id 1)
    torch.testing.assert_close(tuned[key][0], base[key][3])  # "bird" is new: the null row
    torch.testing.assert_close(tuned[key][2], base[key][3])  # null row at the new index
    pipe = DiffiTPipeline.from_pretrained(out)
    assert pipe.transformer.config.num_classes == 2 and pipe.id2label == {0: ["bird"], 1: ["dog"]}
    card = (out / "README.md").read_text()
    assert f"fine-tuned from the pipeline in `{latent_run}`" in card and "base_model" not in card  # local: no Hub link
    assert pipe.config.num_inference_steps == 250  # the base pipeline's sampling defaults are kept


def test_finetuning_to_unconditional_keeps_the_null_class_function(work, latent_run, tmp_path):
    flat = write_image_folder(tmp_path / "data", ["x"], per_class=2) / "x"  # no class sub-folders
    out = tmp_path / "unconditional"
    run_in_process(train_diffit, ["--pretrained_model_name_or_path", latent_run, "--train_data_dir", flat,
                                  "--output_dir", out, "--train_batch_size", 2, "--max_train_steps", 1,
                                  "--learning_rate", 0, "--report_to", "none", "--checkpointing_steps", 100])
    base = DiffiTTransformer2DModel.from_pretrained(latent_run, subfolder="transformer").eval()
    tuned = DiffiTTransformer2DModel.from_pretrained(out, subfolder="transformer").eval()
    assert tuned.config.num_classes == 0
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 600])
    with torch.no_grad():
        torch.testing.assert_close(tuned(x, t).sample, base(x, t).sample, rtol=1e-5, atol=1e-5)
    images = DiffiTPipeline.from_pretrained(out)(num_images_per_label=2, num_inference_steps=2, output_type="np")
    assert images.images.shape == (2, 16, 16, 3)


def test_loss_decreases_on_a_trivial_dataset(work, tmp_path):
    data = tmp_path / "data"
    for c, value in enumerate((40, 210)):  # two classes of flat images
        (data / str(c)).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(data / str(c) / f"{i}.png")
    out = tmp_path / "out"
    run_in_process(train_diffit, ["--model_config_name_or_path", work["unet"], "--train_data_dir", data,
                                  "--output_dir", out, "--train_batch_size", 8, "--max_train_steps", 40,
                                  "--learning_rate", 3e-3, "--checkpointing_steps", 100, "--report_to", "none"])
    trained = DiffiTUNet2DModel.from_pretrained(out, subfolder="transformer")
    untrained = DiffiTUNet2DModel.from_config(trained.config)  # zero-initialised head: D(x; σ) = c_skip·x
    clean = torch.tensor([-1 + 2 * 40 / 255, -1 + 2 * 210 / 255]).repeat(128).view(-1, 1, 1, 1).expand(-1, 1, 8, 8)
    labels = torch.tensor([0, 1]).repeat(128)

    def loss(model):  # the EDM loss on a fixed draw of 256 noise levels and noises
        with torch.no_grad():
            return edm_loss(model.eval(), clean, labels, generator=torch.Generator().manual_seed(0)).item()

    before, after = loss(untrained), loss(trained)
    assert after < 0.7 * before, (before, after)  # 1.30 -> 0.72 here


def test_bad_arguments_fail_clearly(work, tmp_path):
    with pytest.raises(ValueError, match="--resolution"):
        run_in_process(train_diffit, latent_args(work, tmp_path / "a", "--resolution", 32, "--max_train_steps", 1))
    with pytest.raises(ValueError, match="smaller than the dataset"):
        run_in_process(train_diffit, latent_args(work, tmp_path / "b", "--num_classes", 2, "--max_train_steps", 1))
    with pytest.raises(ValueError, match="validation_labels"):
        run_in_process(train_diffit, latent_args(work, tmp_path / "e", "--validation_steps", 1,
                                                 "--validation_labels", 3))
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        run_in_process(train_diffit, latent_args(work, tmp_path / "c", "--max_train_steps", 1,
                                                 "--resume_from_checkpoint", tmp_path))
    with pytest.raises(ValueError, match="allowed"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"_class_name": "UNet2DModel"}))
        run_in_process(train_diffit, ["--model_config_name_or_path", bad, "--train_data_dir", work["rgb"],
                                      "--output_dir", tmp_path / "d", "--report_to", "none"])
    with pytest.raises(SystemExit):  # two data sources
        train_diffit.parse_args(["--model_config_name_or_path", "x", "--train_data_dir", "a", "--latents_dir", "b"])


# ------------------------------------------------------------------------------------------------------------------
# kill -9 and resume; two processes
# ------------------------------------------------------------------------------------------------------------------

# Runs a script (argv[1:]) with SIGKILL hooks, for the resume test only:
#   DIFFIT_TEST_KILL=write:N  -> the N-th file written into a `.tmp-checkpoint-*` folder gets half its bytes, then
#                                the process SIGKILLs itself (a crash in the middle of writing a checkpoint);
#   DIFFIT_TEST_KILL=time:S   -> SIGKILL S seconds after training starts;
#   DIFFIT_TEST_SLOW_SAVE=S   -> sleep S seconds before each checkpoint file, so random kills often hit a save.
KILL_WRAPPER = r"""
import io, os, runpy, signal, sys, threading, time
import safetensors.torch, torch
import diffusers_diffit.training as training

mode = os.environ.get("DIFFIT_TEST_KILL", "")
slow = float(os.environ.get("DIFFIT_TEST_SLOW_SAVE", "0"))
writes = 0

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def hooked(original, to_bytes):
    def save(obj, path, *args, **kwargs):
        global writes
        if ".tmp-checkpoint-" not in str(path):
            return original(obj, path, *args, **kwargs)
        time.sleep(slow)
        writes += 1
        if mode == f"write:{writes}":
            data = to_bytes(obj, *args, **kwargs)
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            die()
        return original(obj, path, *args, **kwargs)
    return save

def torch_bytes(obj, *args, **kwargs):
    buffer = io.BytesIO()
    torch_save(obj, buffer)
    return buffer.getvalue()

torch_save = torch.save
torch.save = hooked(torch.save, torch_bytes)
safetensors.torch.save_file = hooked(
    safetensors.torch.save_file, lambda tensors, metadata=None: safetensors.torch.save(tensors, metadata=metadata))
if mode.startswith("time:"):
    remove_partial = training.CheckpointManager.remove_partial
    def start_clock(self):
        threading.Timer(float(mode[5:]), die).start()
        return remove_partial(self)
    training.CheckpointManager.remove_partial = start_clock

sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_subprocess(argv: list, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", KILL_WRAPPER, str(EXAMPLES / "train_diffit.py"), *map(str, argv)]
    return subprocess.run(cmd, env={**ENV, **(env or {})}, cwd=cwd, capture_output=True, text=True, timeout=300)


def read_run(out: Path, step: int) -> dict[str, torch.Tensor]:
    """Everything a resumed run must reproduce: final (EMA) weights, raw weights, EMA, optimizer and LR state."""
    ckpt = out / f"checkpoint-{step}"
    final = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    tensors = {f"final.{k}": v for k, v in final.items()}
    for name in ("model", "model_ema"):
        tensors |= {f"{name}.{k}": v for k, v in load_file(ckpt / name / "diffusion_pytorch_model.safetensors").items()}
    optimizer = torch.load(ckpt / "optimizer.bin", weights_only=True)
    for i, state in optimizer["state"].items():
        tensors |= {f"adam.{i}.{k}": torch.as_tensor(v, dtype=torch.float64) for k, v in state.items()}
    scheduler = torch.load(ckpt / "scheduler.bin", weights_only=True)
    tensors["lr"] = torch.tensor(scheduler["_last_lr"], dtype=torch.float64)
    ema_config = json.loads((ckpt / "model_ema" / "config.json").read_text())
    tensors["ema_step"] = torch.tensor(ema_config["optimization_step"])
    return tensors


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_latest_matches_an_uninterrupted_run(work, tmp_path):
    steps = 8  # 6 micro-batches of 2 per epoch, 2 per step: 3 steps per epoch, resumes land mid-epoch
    args = ["--model_config_name_or_path", work["transformer"], "--vae", work["vae"], "--train_data_dir", work["rgb"],
            "--train_batch_size", 2, "--gradient_accumulation_steps", 2, "--max_train_steps", steps,
            "--checkpointing_steps", 2, "--checkpoints_total_limit", 2, "--use_ema", "--ema_decay", 0.9,
            "--random_flip", "--learning_rate", 1e-3, "--lr_scheduler", "cosine", "--lr_warmup_steps", 2,
            "--validation_steps", 3, "--validation_inference_steps", 2, "--report_to", "none"]
    reference = tmp_path / "reference"
    run_in_process(train_diffit, [*args, "--output_dir", reference])

    out = tmp_path / "killed"
    resume = [*args, "--output_dir", out, "--resume_from_checkpoint", "latest"]
    rng = random.Random()
    write = rng.randint(1, 10)  # 5 files per checkpoint: model, EMA, optimizer, LR scheduler, RNG state
    killed = run_subprocess(resume, {"DIFFIT_TEST_KILL": f"write:{write}"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    partial = list(out.glob(".tmp-checkpoint-*"))
    assert len(partial) == 1, f"write {write}: {sorted(p.name for p in out.iterdir())}"
    expected_latest = None if write <= 5 else out / "checkpoint-2"
    assert CheckpointManager(out, None).latest() == expected_latest  # the half-written one is never picked

    delays = [round(rng.uniform(0.0, 2.5), 2) for _ in range(2)]
    for delay in delays:  # kills at random moments (slow saves: often while writing a checkpoint)
        result = run_subprocess(resume, {"DIFFIT_TEST_KILL": f"time:{delay}", "DIFFIT_TEST_SLOW_SAVE": "0.1"})
        assert result.returncode in (0, -signal.SIGKILL), result.stderr[-3000:]
    final = run_subprocess(resume)
    assert final.returncode == 0, final.stderr[-3000:]

    expected, got = read_run(reference, steps), read_run(out, steps)
    assert expected.keys() == got.keys()
    worst = max((expected[k].double() - got[k].double()).abs().max().item() for k in expected)
    assert worst <= 1e-6, f"max |Δ| = {worst} (write kill {write}, time kills {delays})"
    assert not list(out.glob(".tmp-*")) and [p.name for p in sorted(out.glob("checkpoint-*"))] == [
        "checkpoint-6", "checkpoint-8"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_processes_with_accelerate_launch(work, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(EXAMPLES / "train_diffit.py"),
           *map(str, latent_args(work, out, "--train_batch_size", 2, "--max_train_steps", 3,
                                 "--checkpointing_steps", 3, "--use_ema", "--validation_steps", 3,
                                 "--validation_inference_steps", 2))]
    result = subprocess.run(cmd, env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batch 2 × 2 processes" in result.stderr
    assert result.stderr.count("Saved the pipeline") == 1  # the main process writes the result, logs and grids
    assert {p.name for p in (out / "checkpoint-3").glob("random_states_*")} == {"random_states_0.pkl",
                                                                                 "random_states_1.pkl"}
    assert len(list((out / "samples").glob("*.png"))) == 1
    images = DiffiTPipeline.from_pretrained(out)(class_labels=[2], num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3)


# ------------------------------------------------------------------------------------------------------------------
# sample_fid.py
# ------------------------------------------------------------------------------------------------------------------


def test_sample_fid_writes_the_evaluator_npz_independent_of_batching(latent_run, tmp_path):
    common = ["--model", latent_run, "--num_samples", 5, "--num_inference_steps", 3, "--seed", 7]
    run_in_process(sample_fid, [*common, "--batch_size", 2, "--output_dir", tmp_path / "a"])
    run_in_process(sample_fid, [*common, "--batch_size", 5, "--output_dir", tmp_path / "b"])
    a, b = np.load(tmp_path / "a" / "samples.npz"), np.load(tmp_path / "b" / "samples.npz")
    assert a["arr_0"].shape == (5, 16, 16, 3) and a["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(a["labels"], b["labels"])
    assert set(a["labels"].tolist()) <= {0, 1, 2}
    assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1  # batching changes only rounding

    images = tmp_path / "a" / "images"
    stamps = {p.name: p.stat().st_mtime_ns for p in images.glob("*.png")}
    (images / "000003.png").unlink()
    run_in_process(sample_fid, [*common, "--batch_size", 2, "--output_dir", tmp_path / "a", "--no_npz"])
    after = {p.name: p.stat().st_mtime_ns for p in images.glob("*.png")}
    assert after.keys() == stamps.keys()
    assert [n for n in after if after[n] != stamps.get(n)] == ["000003.png"]  # only the missing sample is redone
