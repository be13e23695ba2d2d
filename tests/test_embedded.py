"""The pipelines shipped inside the package (digits, digits-latent) and the `diffit` console script: offline, finite,
right shapes, the digits asked for."""

import configparser
import fnmatch
import importlib.metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, EDMDPMSolverMultistepScheduler
from sklearn.svm import SVC

import diffusers_diffit.cli
from diffusers_diffit import (
    DiffiTPipeline,
    DiffiTTransformer2DModel,
    DiffiTUNet2DModel,
    embedded_model_path,
    official_scheduler,
)
from diffusers_diffit.data.digits import LATENT_OFFICIAL_RECIPE, digits_split, model_to_ink
from diffusers_diffit.utils import vae_scale_factor


ROOT = Path(__file__).resolve().parents[1]


def shipped_files(name: str) -> tuple[Path, list[str]]:
    """(folder, its files relative to the package) of a shipped model; every file is matched by setup.cfg's
    package_data, so the wheel has it."""
    folder = Path(embedded_model_path(name))
    files = [p.relative_to(folder.parents[1]).as_posix() for p in folder.rglob("*") if p.is_file()]
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    globs = [g.strip() for g in config["options.package_data"]["diffusers_diffit"].split(",")]
    assert [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)] == []
    return folder, files


@pytest.fixture(scope="module")
def pipe() -> DiffiTPipeline:
    pipe = DiffiTPipeline.from_pretrained(embedded_model_path("digits"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_folder_is_small_safetensors_and_in_the_wheel():
    folder, files = shipped_files("digits")
    assert {
        "embedded/digits/model_index.json",
        "embedded/digits/transformer/config.json",
        "embedded/digits/transformer/diffusion_pytorch_model.safetensors",
        "embedded/digits/scheduler/scheduler_config.json",
    } <= set(files)
    assert sum((folder.parents[1] / f).stat().st_size for f in files) < 5e6
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert "diffusers_diffit.embedded" in config["options"]["packages"].split()


def test_embedded_model_path_errors():
    with pytest.raises(ValueError, match="'digits'"):
        embedded_model_path("imagenet")


def test_loads_offline_with_the_right_components(pipe):
    assert isinstance(pipe.transformer, DiffiTUNet2DModel)
    assert isinstance(pipe.scheduler, EDMDPMSolverMultistepScheduler)  # the 12-call recipe of benchmarks/nfe_study.py
    assert pipe.vae is None
    assert pipe.transformer.config.num_classes == 10 and pipe.transformer.config.sample_size == 16
    assert pipe.get_label_ids("7") == [7]


def test_samples_finite_images_of_the_right_shape(pipe):
    images = pipe(
        [0, 9], num_images_per_label=2, num_inference_steps=4, generator=torch.manual_seed(0), output_type="pt"
    ).images
    assert images.shape == (4, 1, 16, 16) and torch.isfinite(images).all()
    pil = pipe(3, num_inference_steps=2, generator=torch.manual_seed(0)).images
    assert pil[0].size == (16, 16) and pil[0].mode == "L"


def test_samples_are_the_digits_asked_for(pipe):
    """An SVM trained on real digits recognises the shipped model's samples (default recipe)."""
    train_ink, train_labels, _, _ = digits_split()
    svm = SVC(C=10, gamma="scale").fit(train_ink.reshape(len(train_ink), -1), train_labels)
    raw = pipe(list(range(10)), num_images_per_label=2, generator=torch.manual_seed(1), output_type="latent").images
    predicted = svm.predict(model_to_ink(raw).reshape(20, -1))
    assert (predicted == np.repeat(np.arange(10), 2)).mean() >= 0.9


def test_console_script_is_declared():
    (entry,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "diffit"]
    assert entry.value == "diffusers_diffit.cli:main" and entry.load() is diffusers_diffit.cli.main


# ------------------------------------------------------------------------------------------------------------------
# digits-latent: a latent DiffiTTransformer2DModel with learned variance and its VAE, trained with NVIDIA's objective
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def latent_pipe() -> DiffiTPipeline:
    pipe = DiffiTPipeline.from_pretrained(embedded_model_path("digits-latent"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_latent_folder_is_shipped_and_loads_in_plain_diffusers():
    folder, files = shipped_files("digits-latent")
    assert sum((folder.parents[1] / f).stat().st_size for f in files) < 8e6
    pipe = DiffusionPipeline.from_pretrained(embedded_model_path("digits-latent"))  # diffusers_diffit is imported
    assert isinstance(pipe, DiffiTPipeline) and isinstance(pipe.vae, AutoencoderKL)


def test_latent_model_is_nvidias_kind(latent_pipe):
    transformer, vae = latent_pipe.transformer, latent_pipe.vae
    assert isinstance(transformer, DiffiTTransformer2DModel) and latent_pipe.denoiser_type == "ddpm"
    assert transformer.config.out_channels == 2 * transformer.config.in_channels == 2 * vae.config.latent_channels
    assert transformer.config.sample_size * vae_scale_factor(vae) == vae.config.sample_size == 32
    assert vae.config.scaling_factor != 1 and vae.config.shift_factor is not None  # measured on the training set


@pytest.mark.parametrize("recipe", ["saved", "official"])
def test_latent_samples_are_the_digits_asked_for(latent_pipe, recipe):
    """An SVM trained on real digits recognises the shipped latent model's samples, under its saved (fast) recipe
    and under NVIDIA's: learned-range DDPM, 250 steps, guidance on 3 latent channels with the power-cosine ramp."""
    train_ink, train_labels, _, _ = digits_split()
    svm = SVC(C=10, gamma="scale").fit(train_ink.reshape(len(train_ink), -1), train_labels)
    pipe = latent_pipe
    if recipe == "official":
        pipe = DiffiTPipeline(
            latent_pipe.transformer, official_scheduler(), vae=latent_pipe.vae, **LATENT_OFFICIAL_RECIPE
        )
        pipe.set_progress_bar_config(disable=True)
    labels = list(range(10))
    images = pipe(labels, num_images_per_label=2, generator=torch.manual_seed(1), output_type="pt").images
    assert images.shape == (20, 1, 32, 32)
    predicted = svm.predict(model_to_ink(images * 2 - 1).reshape(20, -1))
    assert (predicted == np.repeat(np.arange(10), 2)).mean() >= 0.9
