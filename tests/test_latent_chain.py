"""The latent chain at tiny scale: train_autoencoder.py -> precompute_latents.py -> train_diffit.py --objective
ddpm-hybrid -> a pipeline folder that samples with NVIDIA's recipe and loads in plain diffusers; and the chain's bad
inputs, each refused before any work with nothing written."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import diffusers_diffit  # noqa: F401  (registers the pipeline with diffusers)
from diffusers_diffit import OFFICIAL_RECIPES, DiffiTPipeline, embedded_model_path, official_scheduler
from diffusers_diffit.data import ImageDataset, load_vae
from diffusers_diffit.utils import normalize_latents
from tests.utils import ROOT, load_example, run_in_process, write_config, write_image_folder


train_autoencoder = load_example("train_autoencoder")
precompute_latents = load_example("precompute_latents")
train_diffit = load_example("train_diffit")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
TINY_VAE_ARGS = ["--resolution", 16, "--channels", 3, "--block_out_channels", 8, 16, "--norm_num_groups", 4]


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    """Images -> VAE (typed as the relative path "vae", from the folder it lives in) -> latents -> a transformer."""
    root = tmp_path_factory.mktemp("chain")
    write_image_folder(root / "images", ["a", "b", "c"], per_class=6, size=(16, 16))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        run_in_process(
            train_autoencoder,
            ["--train_data_dir", "images", "--output_dir", "vae", "--max_train_steps", 3, "--train_batch_size", 4]
            + TINY_VAE_ARGS,
        )
        run_in_process(
            precompute_latents,
            ["--vae", "vae", "--train_data_dir", "images", "--resolution", 16, "--output_dir", "latents"],
        )
    finally:
        os.chdir(cwd)
    write_config(root / "transformer.json", "tiny-transformer")
    common = ["--model_config_name_or_path", root / "transformer.json", "--train_batch_size", 4, "--report_to", "none"]
    run_in_process(  # started from another folder than the latents were made in: the recorded VAE is still found
        train_diffit,
        [
            *common,
            "--latents_dir",
            root / "latents",
            "--objective",
            "ddpm-hybrid",
            "--max_train_steps",
            3,
            "--use_ema",
            "--ema_warmup",
            "--label_dropout",
            0.2,
            "--output_dir",
            root / "pipeline",
        ],
    )
    return {"root": root, "vae": root / "vae", "latents": root / "latents", "pipeline": root / "pipeline"}


def test_autoencoder_latent_scale_normalises_the_training_set(chain):
    """scaling_factor and shift_factor are measured on the training set: the normalised latents of fresh posterior
    samples have mean ~0 and std ~1 (3·16·8·8·... elements; the tolerance covers the sampling noise)."""
    vae = load_vae(chain["vae"])
    assert vae.config.latent_channels == 4 and vae.config.shift_factor is not None
    data = ImageDataset.from_folder(chain["root"] / "images", 16, center_crop=True)
    pixels = next(iter(DataLoader(data, batch_size=len(data))))["pixel_values"]
    with torch.no_grad():
        z = vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(123))
    normalised = normalize_latents(vae, z)
    # 18 images: a fresh draw of the posterior noise moves the statistics by a few percent at most
    assert abs(normalised.mean().item()) < 0.05 and abs(normalised.std().item() - 1) < 0.05
    card = (chain["vae"] / "README.md").read_text()
    assert "held-out PSNR" in card and f"{vae.config.scaling_factor:.6g}" in card


def test_latents_record_the_vae_as_typed_with_a_fingerprint(chain):
    metadata = json.loads((chain["latents"] / "metadata.json").read_text())
    assert metadata["vae"] == "vae" and metadata["vae_path"] == str(chain["vae"].resolve())
    assert len(metadata["vae_fingerprint"]) == 64 and metadata["shift_factor"] is not None


def test_chain_writes_a_pipeline_that_samples_with_the_official_recipe_and_loads_in_diffusers(chain):
    pipe = DiffusionPipeline.from_pretrained(chain["pipeline"])
    assert isinstance(pipe, DiffiTPipeline) and pipe.denoiser_type == "ddpm"
    assert pipe.scheduler.config.variance_type == "learned_range" and pipe.config.num_inference_steps == 250
    assert load_vae(chain["pipeline"]).config.scaling_factor == load_vae(chain["vae"]).config.scaling_factor
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a", 2], generator=torch.manual_seed(0), output_type="np", **OFFICIAL_RECIPES[256]).images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    assert pipe.num_timesteps == 250


def refused(argv: list, match: str, output_dir) -> None:
    """`train_diffit.main(argv)` raises a ValueError matching `match`, and `output_dir` was not created."""
    with pytest.raises(ValueError, match=match):
        run_in_process(train_diffit, argv)
    assert not os.path.exists(output_dir)


def test_vae_with_other_latent_channels_is_refused_before_any_work(chain, tmp_path):
    write_config(tmp_path / "three.json", "tiny-transformer", in_channels=3, out_channels=6)
    argv = ["--model_config_name_or_path", tmp_path / "three.json", "--vae", chain["vae"]]
    argv += ["--train_data_dir", chain["root"] / "images", "--output_dir", tmp_path / "out", "--report_to", "none"]
    refused(argv, "The VAE has 4 latent channels but the model takes 3", tmp_path / "out")
    # the command line gets one line and exit status 2
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_diffit.py"), *map(str, argv)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("train_diffit.py: error: The VAE has 4 latent channels")
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_latents_of_another_vae_or_scale_are_refused(chain, tmp_path):
    other = load_vae(chain["vae"])
    other.register_to_config(scaling_factor=other.config.scaling_factor * 2)  # same weights, another scale
    other.save_pretrained(tmp_path / "other-vae")
    argv = ["--model_config_name_or_path", chain["root"] / "transformer.json", "--latents_dir", chain["latents"]]
    argv += ["--vae", tmp_path / "other-vae", "--output_dir", tmp_path / "out", "--report_to", "none"]
    refused(argv, "was encoded with another VAE", tmp_path / "out")


def test_recorded_vae_that_is_gone_is_named(chain, tmp_path):
    moved = tmp_path / "latents"
    moved.mkdir()
    metadata = json.loads((chain["latents"] / "metadata.json").read_text())
    for name in metadata["shards"]:
        (moved / name).symlink_to(chain["latents"] / name)
    (moved / "metadata.json").write_text(json.dumps({**metadata, "vae_path": str(tmp_path / "gone")}))
    argv = ["--model_config_name_or_path", chain["root"] / "transformer.json", "--latents_dir", moved]
    argv += ["--output_dir", tmp_path / "out", "--report_to", "none"]
    refused(argv, f"encoded with, 'vae' \\(then at '{tmp_path / 'gone'}'\\), is not there any more", tmp_path / "out")


def test_folder_without_readable_images_is_refused_naming_the_file(tmp_path):
    (tmp_path / "images" / "a").mkdir(parents=True)
    (tmp_path / "images" / "a" / "0.png").write_bytes(b"not a png")
    Image.new("L", (16, 16)).save(tmp_path / "images" / "a" / "1.bmp", format="PNG")  # a PNG named .bmp decodes
    bad = str(tmp_path / "images" / "a" / "0.png")
    with pytest.raises(ValueError, match=f"'{bad}' is not a readable image"):
        run_in_process(
            train_autoencoder,
            ["--train_data_dir", tmp_path / "images", "--output_dir", tmp_path / "vae", *TINY_VAE_ARGS],
        )
    assert not (tmp_path / "vae").exists()
    with pytest.raises(ValueError, match=f"'{bad}' is not a readable image"):
        ImageDataset.from_folder(tmp_path / "images", 16)


def test_ddpm_objective_with_an_edm_scheduler_is_refused(chain, tmp_path):
    argv = ["--model_config_name_or_path", chain["root"] / "transformer.json", "--latents_dir", chain["latents"]]
    argv += ["--objective", "ddpm-hybrid", "--recipe_from", embedded_model_path("digits")]
    argv += ["--output_dir", tmp_path / "out", "--report_to", "none"]
    refused(argv, "trains a 'ddpm' denoiser, but the written pipeline would sample with", tmp_path / "out")


def test_a_constant_ema_too_slow_for_the_run_is_warned_about(chain, tmp_path, caplog):
    """A constant decay of 0.9999 over 2 steps keeps ~100 % of the initial weights in the saved model (on
    digits-latent, 4000 such steps sampled noise): the run says so."""
    argv = ["--model_config_name_or_path", chain["root"] / "transformer.json", "--latents_dir", chain["latents"]]
    argv += ["--max_train_steps", 2, "--use_ema", "--report_to", "none"]
    with caplog.at_level("WARNING"):
        run_in_process(train_diffit, [*argv, "--output_dir", tmp_path / "constant"])
    assert "the saved EMA weights will still be 100% the initial ones" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        run_in_process(train_diffit, [*argv, "--ema_warmup", "--output_dir", tmp_path / "warmup"])
    assert "Saved the pipeline" in caplog.text or (tmp_path / "warmup" / "model_index.json").is_file()
    assert "EMA weights" not in caplog.text


class ExactDenoiser(ModelMixin, ConfigMixin):
    """The exact ε of a class-conditional data set of latents: E[x0 | x_t, y] is the softmax-weighted mean of the
    latents of class y (all latents for the null class), ε = (x_t − √ᾱ_t·E[x0 | x_t, y]) / √(1 − ᾱ_t)."""

    @register_to_config
    def __init__(self, latents: list, labels: list, in_channels: int, sample_size: int, num_classes: int):
        super().__init__()
        self.register_buffer("data", torch.tensor(latents).flatten(1))  # [N, C·H·W]
        self.register_buffer("data_labels", torch.tensor(labels))  # [N]
        self.register_buffer("alphas_cumprod", official_scheduler().alphas_cumprod)

    def forward(self, x, timestep, class_labels=None, return_dict=True):
        alpha_bar = self.alphas_cumprod[timestep.long()].view(-1, 1)  # [B, 1]
        flat = x.flatten(1)  # [B, D]
        distance = ((flat[:, None] - alpha_bar.sqrt()[:, :, None] * self.data[None]) ** 2).sum(-1)  # [B, N]
        allowed = (class_labels[:, None] == self.data_labels[None]) | (
            class_labels[:, None] == self.config.num_classes
        )
        weights = torch.softmax(torch.where(allowed, -distance / (2 * (1 - alpha_bar)), -torch.inf), dim=1)
        eps = (flat - alpha_bar.sqrt() * (weights @ self.data)) / (1 - alpha_bar).sqrt()
        return (eps.view_as(x),)


def test_the_pipeline_samples_the_data_of_an_exact_denoiser(chain):
    """With the exact ε of the cached training latents as the model, NVIDIA's sampler (learned-range DDPM with v
    absent: fixed_small) and DDIM reproduce training latents of the class asked for: the pipeline, the scheduler
    and the latent normalisation are right independently of any training."""
    vae = load_vae(chain["vae"])
    shard = load_file(chain["latents"] / "shard-00000.safetensors")
    x0 = normalize_latents(vae, shard["moments"][:, : vae.config.latent_channels])  # the posterior means
    denoiser = ExactDenoiser(x0.tolist(), shard["labels"].tolist(), 4, x0.shape[-1], 3)
    scheduler = DDPMScheduler.from_config(official_scheduler().config, variance_type="fixed_small")
    for scheduler, steps in ((scheduler, 250), (DDIMScheduler.from_config(scheduler.config), 50)):
        pipe = DiffiTPipeline(denoiser, scheduler, vae=vae, denoiser_type="ddpm")
        pipe.set_progress_bar_config(disable=True)
        labels = [0, 1, 2, 0, 1, 2]
        samples = pipe(labels, num_inference_steps=steps, generator=torch.manual_seed(0), output_type="latent").images
        distance = ((samples.flatten(1)[:, None] - x0.flatten(1)[None]) ** 2).mean(-1)  # [6, N]
        nearest = distance.min(1)
        assert (nearest.values < 1e-3).all(), nearest.values  # a training latent (their spread is ~1)
        assert shard["labels"][nearest.indices].tolist() == labels


def test_autoencoder_arguments_are_checked_before_any_work(tmp_path):
    base = ["--digits", "--resolution", 32, "--output_dir", tmp_path / "vae"]
    for extra in (["--kl_weight", -1], ["--learning_rate", 0], ["--resolution", 30], ["--norm_num_groups", 5]):
        with pytest.raises(SystemExit):
            train_autoencoder.parse_args([str(a) for a in base + extra])
    assert not (tmp_path / "vae").exists()
