"""The digits pipeline shipped inside the package and the `diffit` console script: offline, finite, right shapes."""

import configparser
import fnmatch
import importlib.metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import EDMDPMSolverMultistepScheduler
from sklearn.svm import SVC

import diffusers_diffit.cli
from diffusers_diffit import DiffiTPipeline, DiffiTUNet2DModel, embedded_model_path
from diffusers_diffit.data.digits import digits_split, model_to_ink


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipe() -> DiffiTPipeline:
    pipe = DiffiTPipeline.from_pretrained(embedded_model_path("digits"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_folder_is_small_safetensors_and_in_the_wheel():
    folder = Path(embedded_model_path("digits"))
    files = [p.relative_to(folder.parents[1]).as_posix() for p in folder.rglob("*") if p.is_file()]
    assert {
        "embedded/digits/model_index.json",
        "embedded/digits/transformer/config.json",
        "embedded/digits/transformer/diffusion_pytorch_model.safetensors",
        "embedded/digits/scheduler/scheduler_config.json",
    } <= set(files)
    assert sum((folder.parents[1] / f).stat().st_size for f in files) < 5e6
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    globs = [g.strip() for g in config["options.package_data"]["diffusers_diffit"].split(",")]
    unshipped = [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)]
    assert unshipped == []
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
