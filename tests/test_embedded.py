"""The digits pipeline shipped inside the package and the `diffit` console script: offline, finite, right shapes."""

import configparser
import fnmatch
import importlib.metadata
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import EDMDPMSolverMultistepScheduler
from sklearn.svm import SVC

import diffusers_diffit
from diffusers_diffit import DiffiTPipeline, DiffiTUNet2DModel, embedded_model_path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from train_digits import (  # noqa: E402
    DIGITS_DIFFIT,
    build_model,
    diffit_overrides,
    digits_split,
    model_to_ink,
    parse_args,
)
from train_digits import main as train_digits_main  # noqa: E402


@pytest.fixture(scope="module")
def pipe() -> DiffiTPipeline:
    pipe = DiffiTPipeline.from_pretrained(embedded_model_path("digits"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_folder_is_small_safetensors_and_in_the_wheel():
    folder = Path(embedded_model_path("digits"))
    files = [p.relative_to(folder.parents[1]).as_posix() for p in folder.rglob("*") if p.is_file()]
    assert {"embedded/digits/model_index.json", "embedded/digits/transformer/config.json",
            "embedded/digits/transformer/diffusion_pytorch_model.safetensors",
            "embedded/digits/scheduler/scheduler_config.json"} <= set(files)
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
    images = pipe([0, 9], num_images_per_label=2, num_inference_steps=4, generator=torch.manual_seed(0),
                  output_type="pt").images
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
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("diffit") == "diffusers_diffit.cli:main"
    assert diffusers_diffit.embedded_model_path is embedded_model_path


def test_train_digits_defaults_are_the_shipped_config():
    # The documented command trains what is shipped; the architecture flags only replace the entries they name.
    shipped = DiffiTUNet2DModel.load_config(Path(embedded_model_path("digits")) / "transformer")
    defaults = build_model("diffit", **diffit_overrides(parse_args([]))).config
    as_json = {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}  # config.json stores lists
    assert {k: as_json[k] for k in DIGITS_DIFFIT} == {k: shipped[k] for k in DIGITS_DIFFIT}
    args = parse_args(["--window_size", "8", "--block_out_channels", "32", "48", "48", "--layers_per_block", "2"])
    model = build_model("diffit", **diffit_overrides(args))
    assert model.window_sizes == [8, 8, 4] and list(model.config.block_out_channels) == [32, 48, 48]
    assert model.config.layers_per_block == 2 and model.config.mlp_ratio == shipped["mlp_ratio"]
    with pytest.raises(ValueError, match="window_size"):
        build_model("unet", window_size=8)


def test_train_digits_trains_and_writes_a_loadable_pipeline(tmp_path):
    """A few steps of the documented command: the raw and EMA models and a pipeline with the recipe asked for."""
    threads = torch.get_num_threads()
    train_digits_main(["--output_dir", str(tmp_path), "--max_train_steps", "3", "--lr_warmup_steps", "1",
                "--block_out_channels", "16", "32", "32", "--time_embedding_dim", "32", "--num_inference_steps", "5"])
    torch.set_num_threads(threads)
    raw = DiffiTUNet2DModel.from_pretrained(tmp_path / "model")
    pipe = DiffiTPipeline.from_pretrained(tmp_path / "pipeline")
    assert pipe.config.num_inference_steps == 5 and pipe.config.guidance_scale == 1.25
    assert list(pipe.transformer.config.block_out_channels) == [16, 32, 32]
    ema, trained = dict(pipe.transformer.named_parameters()), dict(raw.named_parameters())
    assert any(not torch.equal(ema[k], trained[k]) for k in ema)  # the pipeline holds the EMA weights
    pipe.set_progress_bar_config(disable=True)
    images = pipe([4], num_inference_steps=2, generator=torch.manual_seed(0), output_type="pt").images
    assert images.shape == (1, 1, 16, 16) and torch.isfinite(images).all()
