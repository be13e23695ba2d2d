"""examples/train_diffit.py end to end: one run per model kind and objective, the digits recipe, fine-tuning, loss
decrease, kill-and-resume equivalence, two processes; and examples/sample_fid.py."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image
from safetensors.torch import load_file

from diffusers_diffit import DiffiTPipeline, DiffiTTransformer2DModel, DiffiTUNet2DModel
from diffusers_diffit.checkpointing import CheckpointManager
from diffusers_diffit.losses import edm_loss
from diffusers_diffit.pipelines import RECIPE_KEYS
from tests.utils import (
    EXAMPLES,
    ROOT,
    free_port,
    load_example,
    run_in_process,
    tiny_transformer,
    write_image_folder,
)


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
train_diffit = load_example("train_diffit")
sample_fid = load_example("sample_fid")
precompute_latents = load_example("precompute_latents")


def latent_args(train_assets, output_dir, *extra) -> list:
    return [
        "--model_config_name_or_path",
        train_assets["transformer"],
        "--vae",
        train_assets["vae"],
        "--train_data_dir",
        train_assets["rgb"],
        "--output_dir",
        output_dir,
        "--train_batch_size",
        4,
        "--report_to",
        "none",
        *extra,
    ]


@pytest.fixture(scope="module")
def latent_run(train_assets) -> Path:
    """One latent run (EMA, flips, validation grid) reused by the fine-tuning tests."""
    out = train_assets["root"] / "latent-run"
    run_in_process(
        train_diffit,
        latent_args(
            train_assets,
            out,
            "--max_train_steps",
            4,
            "--checkpointing_steps",
            2,
            "--use_ema",
            "--random_flip",
            "--validation_steps",
            4,
            "--validation_inference_steps",
            2,
        ),
    )
    return out


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
    images = pipe(
        class_labels=["dog", 0], num_inference_steps=2, generator=torch.manual_seed(0), output_type="np"
    ).images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


def test_image_space_unet_trains_with_edm_and_loads(train_assets):
    out = train_assets["root"] / "unet-run"
    run_in_process(
        train_diffit,
        [
            "--model_config_name_or_path",
            train_assets["unet"],
            "--train_data_dir",
            train_assets["gray"],
            "--output_dir",
            out,
            "--train_batch_size",
            4,
            "--max_train_steps",
            3,
            "--checkpointing_steps",
            3,
            "--report_to",
            "none",
            "--use_ema",
            "--mixed_precision",
            "bf16",
            "--gradient_checkpointing",
        ],
    )
    pipe = DiffiTPipeline.from_pretrained(out)
    assert type(pipe.scheduler).__name__ == "EDMHeunScheduler" and pipe.vae is None
    assert pipe.transformer.config.num_classes == 2 and pipe.config.num_inference_steps == 18
    images = pipe(class_labels=[0, 1], num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


def test_cached_latents_train_exactly_like_encoding_on_the_fly(train_assets, tmp_path):
    latents = tmp_path / "latents"
    run_in_process(
        precompute_latents,
        [
            "--vae",
            train_assets["vae"],
            "--train_data_dir",
            train_assets["rgb"],
            "--resolution",
            16,
            "--output_dir",
            latents,
        ],
    )
    common = [
        "--model_config_name_or_path",
        train_assets["transformer"],
        "--train_batch_size",
        4,
        "--max_train_steps",
        3,
        "--checkpointing_steps",
        100,
        "--report_to",
        "none",
        "--learning_rate",
        1e-3,
    ]
    run_in_process(
        train_diffit,
        [*common, "--latents_dir", latents, "--output_dir", tmp_path / "cached", "--dataloader_num_workers", 2],
    )  # workers reopen the shards; order is unchanged
    run_in_process(
        train_diffit,
        [
            *common,
            "--train_data_dir",
            train_assets["rgb"],
            "--center_crop",
            "--vae",
            train_assets["vae"],
            "--output_dir",
            tmp_path / "images",
        ],
    )
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


def test_objective_must_fit_the_scheduler_of_the_written_pipeline(latent_run, train_assets, tmp_path):
    with pytest.raises(
        ValueError, match="trains a 'edm' denoiser, but the written pipeline would sample with DDPMScheduler"
    ):
        run_in_process(
            train_diffit,
            [
                "--pretrained_model_name_or_path",
                latent_run,
                "--objective",
                "edm",
                "--train_data_dir",
                train_assets["rgb"],
                "--output_dir",
                tmp_path,
                "--report_to",
                "none",
            ],
        )


@pytest.mark.parametrize("label_dropout", [0.0, 0.5])
def test_label_dropout_trains_the_null_class_row(train_assets, tmp_path, label_dropout):
    """Dropped labels become the null class, whose row of the label table then trains; without dropout it never
    sees a gradient. The model's own dropout is off: the script drops labels, the same way for every architecture."""
    out = tmp_path / "run"
    run_in_process(
        train_diffit,
        [
            "--model_config_name_or_path",
            train_assets["unet"],
            "--train_data_dir",
            train_assets["gray"],
            "--output_dir",
            out,
            "--train_batch_size",
            4,
            "--max_train_steps",
            2,
            "--learning_rate",
            1e-2,
            "--label_dropout",
            label_dropout,
            "--checkpointing_steps",
            100,
            "--report_to",
            "none",
        ],
    )
    trained = DiffiTUNet2DModel.from_pretrained(out, subfolder="transformer")
    torch.manual_seed(0)  # train_diffit's initialisation: set_seed(--seed 0) before building the model
    start = DiffiTUNet2DModel.from_config(trained.config)
    table, initial = trained.condition_embed.class_embedder.weight, start.condition_embed.class_embedder.weight
    assert trained.config.class_dropout_prob == 0.0
    assert not torch.equal(table[:2], initial[:2])  # the two classes trained
    assert torch.equal(table[2], initial[2]) == (label_dropout == 0)  # the null row: only with dropout


def test_digits_recipe_trains_both_architectures_into_pipelines_with_the_shipped_recipe(tmp_path, monkeypatch):
    """The documented digits command (examples/digits.args, run from the repository root), shortened: the DiffiT and
    the U-Net baseline become pipelines that sample with the shipped model's recipe."""
    from diffusers_diffit.data.digits import write_digits_folder

    monkeypatch.chdir(ROOT)
    write_digits_folder(tmp_path / "data")
    short = ["--train_data_dir", tmp_path / "data", "--max_train_steps", 2, "--train_batch_size", 8]
    run_in_process(
        train_diffit,
        [
            "@examples/digits.args",
            *short,
            "--output_dir",
            tmp_path / "diffit",
            "--config_overrides",
            "block_out_channels=[16,32,32]",
            "time_embedding_dim=32",
        ],
    )
    run_in_process(
        train_diffit, ["@examples/digits.args", *short, "--output_dir", tmp_path / "unet", "--architecture", "unet"]
    )
    shipped = DiffiTPipeline.from_pretrained(ROOT / "diffusers_diffit" / "embedded" / "digits")
    for name, model_cls in (("diffit", DiffiTUNet2DModel), ("unet", UNet2DModel)):
        pipe = DiffiTPipeline.from_pretrained(tmp_path / name)
        assert isinstance(pipe.transformer, model_cls) and pipe.transformer.config.num_classes == 10
        assert type(pipe.scheduler) is type(shipped.scheduler) and pipe.denoiser_type == "edm"
        assert {k: pipe.config[k] for k in RECIPE_KEYS} == {k: shipped.config[k] for k in RECIPE_KEYS}
        assert pipe.id2label == shipped.id2label
        pipe.set_progress_bar_config(disable=True)
        images = pipe([3, 7], num_inference_steps=2, generator=torch.manual_seed(0), output_type="pt").images
        assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()
    config = DiffiTPipeline.from_pretrained(tmp_path / "diffit").transformer.config
    assert (
        list(config.block_out_channels) == [16, 32, 32]
        and config.window_size == shipped.transformer.config.window_size
    )


def test_named_digits_config_is_the_shipped_model():
    shipped = DiffiTUNet2DModel.load_config(ROOT / "diffusers_diffit" / "embedded" / "digits" / "transformer")
    model_cls, config = train_diffit.scratch_config("DiffiT-digits", "diffit", {})
    built = model_cls.from_config(config).config
    assert model_cls is DiffiTUNet2DModel
    assert {k: built[k] for k in shipped if not k.startswith("_")} == {
        k: tuple(v) if isinstance(v, list) else v for k, v in shipped.items() if not k.startswith("_")
    }


def test_finetuning_with_other_classes_applies_the_label_rule(train_assets, latent_run, tmp_path):
    data = write_image_folder(tmp_path / "data", ["bird", "dog"], per_class=2)
    out = tmp_path / "finetuned"
    run_in_process(
        train_diffit,
        [
            "--pretrained_model_name_or_path",
            latent_run,
            "--train_data_dir",
            data,
            "--output_dir",
            out,
            "--train_batch_size",
            2,
            "--max_train_steps",
            1,
            "--learning_rate",
            0,
            "--report_to",
            "none",
            "--checkpointing_steps",
            100,
        ],
    )
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


def test_finetuning_to_unconditional_keeps_the_null_class_function(train_assets, latent_run, tmp_path):
    flat = write_image_folder(tmp_path / "data", ["x"], per_class=2) / "x"  # no class sub-folders
    out = tmp_path / "unconditional"
    run_in_process(
        train_diffit,
        [
            "--pretrained_model_name_or_path",
            latent_run,
            "--train_data_dir",
            flat,
            "--output_dir",
            out,
            "--train_batch_size",
            2,
            "--max_train_steps",
            1,
            "--learning_rate",
            0,
            "--report_to",
            "none",
            "--checkpointing_steps",
            100,
        ],
    )
    base = DiffiTTransformer2DModel.from_pretrained(latent_run, subfolder="transformer").eval()
    tuned = DiffiTTransformer2DModel.from_pretrained(out, subfolder="transformer").eval()
    assert tuned.config.num_classes == 0
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 600])
    with torch.no_grad():
        torch.testing.assert_close(tuned(x, t).sample, base(x, t).sample, rtol=1e-5, atol=1e-5)
    images = DiffiTPipeline.from_pretrained(out)(num_images_per_label=2, num_inference_steps=2, output_type="np")
    assert images.images.shape == (2, 16, 16, 3)


def test_loss_decreases_on_a_trivial_dataset(train_assets, tmp_path):
    data = tmp_path / "data"
    for c, value in enumerate((40, 210)):  # two classes of flat images
        (data / str(c)).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(data / str(c) / f"{i}.png")
    out = tmp_path / "out"
    run_in_process(
        train_diffit,
        [
            "--model_config_name_or_path",
            train_assets["unet"],
            "--train_data_dir",
            data,
            "--output_dir",
            out,
            "--train_batch_size",
            8,
            "--max_train_steps",
            40,
            "--learning_rate",
            3e-3,
            "--checkpointing_steps",
            100,
            "--report_to",
            "none",
        ],
    )
    trained = DiffiTUNet2DModel.from_pretrained(out, subfolder="transformer")
    untrained = DiffiTUNet2DModel.from_config(trained.config)  # zero-initialised head: D(x; σ) = c_skip·x
    clean = torch.tensor([-1 + 2 * 40 / 255, -1 + 2 * 210 / 255]).repeat(128).view(-1, 1, 1, 1).expand(-1, 1, 8, 8)
    labels = torch.tensor([0, 1]).repeat(128)

    def loss(model):  # the EDM loss on a fixed draw of 256 noise levels and noises
        with torch.no_grad():
            return edm_loss(model.eval(), clean, labels, generator=torch.Generator().manual_seed(0)).item()

    before, after = loss(untrained), loss(trained)
    assert after < 0.7 * before, (before, after)  # 1.30 -> 0.72 here


def test_bad_arguments_fail_clearly(train_assets, tmp_path):
    with pytest.raises(ValueError, match="--resolution"):
        run_in_process(
            train_diffit, latent_args(train_assets, tmp_path / "a", "--resolution", 32, "--max_train_steps", 1)
        )
    with pytest.raises(ValueError, match="smaller than the dataset"):
        run_in_process(
            train_diffit, latent_args(train_assets, tmp_path / "b", "--num_classes", 2, "--max_train_steps", 1)
        )
    with pytest.raises(ValueError, match="validation_labels"):
        run_in_process(
            train_diffit, latent_args(train_assets, tmp_path / "e", "--validation_steps", 1, "--validation_labels", 3)
        )
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        run_in_process(
            train_diffit,
            latent_args(train_assets, tmp_path / "c", "--max_train_steps", 1, "--resume_from_checkpoint", tmp_path),
        )
    with pytest.raises(ValueError, match="allowed"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"_class_name": "VQModel"}))
        run_in_process(
            train_diffit,
            [
                "--model_config_name_or_path",
                bad,
                "--train_data_dir",
                train_assets["rgb"],
                "--output_dir",
                tmp_path / "d",
                "--report_to",
                "none",
            ],
        )
    with pytest.raises(ValueError, match="not UNet2DModel config entries"):
        run_in_process(
            train_diffit,
            [
                "--model_config_name_or_path",
                "DiffiT-digits",
                "--architecture",
                "unet",
                "--config_overrides",
                "window_size=8",
                "--train_data_dir",
                train_assets["gray"],
                "--output_dir",
                tmp_path / "f",
                "--report_to",
                "none",
            ],
        )
    with pytest.raises(ValueError, match="has no config named 'DiffiT-CIFAR10'"):
        run_in_process(
            train_diffit,
            [
                "--model_config_name_or_path",
                "DiffiT-CIFAR10",
                "--architecture",
                "unet",
                "--train_data_dir",
                train_assets["gray"],
                "--output_dir",
                tmp_path / "g",
            ],
        )
    with pytest.raises(SystemExit):  # not JSON
        train_diffit.parse_args(
            ["--model_config_name_or_path", "x", "--train_data_dir", "a", "--config_overrides", "window_size=eight"]
        )
    with pytest.raises(SystemExit):  # not a pipeline folder
        train_diffit.parse_args(
            ["--model_config_name_or_path", "x", "--train_data_dir", "a", "--recipe_from", str(tmp_path)]
        )
    with pytest.raises(SystemExit):  # two data sources
        train_diffit.parse_args(["--model_config_name_or_path", "x", "--train_data_dir", "a", "--latents_dir", "b"])


def test_a_bad_image_stops_the_run_before_anything_is_built_unless_skipped(train_assets, tmp_path):
    data = write_image_folder(tmp_path / "data", ["cat", "dog"], per_class=2)
    (data / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(ValueError, match=r"broken.png' is not a readable image.*--on_bad_image skip"):
        run_in_process(
            train_diffit, latent_args({**train_assets, "rgb": data}, tmp_path / "a", "--max_train_steps", 1)
        )
    assert not (tmp_path / "a").exists()  # stopped before the model or the output folder
    run_in_process(
        train_diffit,
        latent_args({**train_assets, "rgb": data}, tmp_path / "b", "--train_batch_size", 2, "--max_train_steps", 1)
        + ["--on_bad_image", "skip", "--checkpointing_steps", 100],
    )
    assert DiffiTPipeline.from_pretrained(tmp_path / "b").transformer.config.num_classes == 2


# ------------------------------------------------------------------------------------------------------------------
# kill -9 and resume; two processes
# ------------------------------------------------------------------------------------------------------------------


def run_subprocess(argv: list, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(ROOT / "tests" / "kill_and_resume.py"),
        str(EXAMPLES / "train_diffit.py"),
        *map(str, argv),
    ]
    return subprocess.run(cmd, env={**ENV, **(env or {})}, cwd=cwd, capture_output=True, text=True, timeout=300)


def read_run(out: Path, step: int) -> dict[str, torch.Tensor]:
    """Everything a resumed run must reproduce: final (EMA) weights, raw weights, EMA, optimizer and LR state."""
    ckpt = out / f"checkpoint-{step}"
    final = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    tensors = {f"final.{k}": v for k, v in final.items()}
    for name in ("model", "model_ema"):
        tensors |= {
            f"{name}.{k}": v for k, v in load_file(ckpt / name / "diffusion_pytorch_model.safetensors").items()
        }
    optimizer = torch.load(ckpt / "optimizer.bin", weights_only=True)
    for i, state in optimizer["state"].items():
        tensors |= {f"adam.{i}.{k}": torch.as_tensor(v, dtype=torch.float64) for k, v in state.items()}
    scheduler = torch.load(ckpt / "scheduler.bin", weights_only=True)
    tensors["lr"] = torch.tensor(scheduler["_last_lr"], dtype=torch.float64)
    ema_config = json.loads((ckpt / "model_ema" / "config.json").read_text())
    tensors["ema_step"] = torch.tensor(ema_config["optimization_step"])
    return tensors


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_latest_matches_an_uninterrupted_run(train_assets, tmp_path):
    steps = 8  # 6 micro-batches of 2 per epoch, 2 per step: 3 steps per epoch, resumes land mid-epoch
    args = [
        "--model_config_name_or_path",
        train_assets["transformer"],
        "--vae",
        train_assets["vae"],
        "--train_data_dir",
        train_assets["rgb"],
        "--train_batch_size",
        2,
        "--gradient_accumulation_steps",
        2,
        "--max_train_steps",
        steps,
        "--checkpointing_steps",
        2,
        "--checkpoints_total_limit",
        2,
        "--use_ema",
        "--ema_decay",
        0.9,
        "--random_flip",
        "--learning_rate",
        1e-3,
        "--lr_scheduler",
        "cosine",
        "--lr_warmup_steps",
        2,
        "--validation_steps",
        3,
        "--validation_inference_steps",
        2,
        "--report_to",
        "none",
    ]
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
    print(f"resume: max |Δ| over {len(expected)} tensors = {worst:.3g} (write kill {write}, time kills {delays})")
    assert worst <= 1e-6, f"max |Δ| = {worst} (write kill {write}, time kills {delays})"
    assert not list(out.glob(".tmp-*")) and [p.name for p in sorted(out.glob("checkpoint-*"))] == [
        "checkpoint-6",
        "checkpoint-8",
    ]


@pytest.mark.slow
def test_sigkill_then_resume_of_a_lora_finetune_onto_a_new_class_matches_an_uninterrupted_run(
    train_assets, latent_run, tmp_path
):
    steps = 6
    data = write_image_folder(tmp_path / "data", ["cat", "dog", "fish", "zebra"], per_class=2)  # zebra is new
    args = [
        "--pretrained_model_name_or_path",
        latent_run,
        "--train_data_dir",
        data,
        "--lora_rank",
        2,
        "--lora_layers",
        "to_q,to_v,to_q_time",
        "--train_batch_size",
        2,
        "--max_train_steps",
        steps,
        "--checkpointing_steps",
        2,
        "--learning_rate",
        1e-2,
        "--report_to",
        "none",
    ]
    reference = tmp_path / "reference"
    run_in_process(train_diffit, [*args, "--output_dir", reference])
    out = tmp_path / "killed"
    resume = [*args, "--output_dir", out, "--resume_from_checkpoint", "latest"]
    delay = round(random.Random().uniform(0.5, 3.0), 2)
    result = run_subprocess(resume, {"DIFFIT_TEST_KILL": f"time:{delay}", "DIFFIT_TEST_SLOW_SAVE": "0.1"})
    assert result.returncode in (0, -signal.SIGKILL), result.stderr[-3000:]
    final = run_subprocess(resume)
    assert final.returncode == 0, final.stderr[-3000:]

    def read(run: Path) -> dict[str, torch.Tensor]:
        tensors = load_file(run / "pytorch_lora_weights.safetensors")
        ckpt = run / f"checkpoint-{steps}"
        tensors |= {
            f"model.{k}": v for k, v in load_file(ckpt / "model" / "diffusion_pytorch_model.safetensors").items()
        }
        optimizer = torch.load(ckpt / "optimizer.bin", weights_only=True)
        for i, state in optimizer["state"].items():
            tensors |= {f"adam.{i}.{k}": torch.as_tensor(v, dtype=torch.float64) for k, v in state.items()}
        return tensors

    expected, got = read(reference), read(out)
    assert expected.keys() == got.keys() and not (out / "transformer").exists()  # the adapter alone is saved
    worst = max((expected[k].double() - got[k].double()).abs().max().item() for k in expected)
    assert worst <= 1e-6, f"max |Δ| = {worst} (kill after {delay} s)"
    rows = "transformer.condition_embed.class_embedder.class_row_ids"
    assert got[rows].tolist() == [3]  # only the new class's row changed; the null row moved, unchanged

    pipe = DiffiTPipeline.from_pretrained(latent_run)
    base_table = pipe.transformer.condition_embed.class_embedder.weight.detach().clone()
    pipe.load_lora_weights(out)
    table = pipe.transformer.condition_embed.class_embedder.weight
    torch.testing.assert_close(table[[0, 1, 2, 4]], base_table, rtol=0, atol=0)  # old rows and the null row kept
    card = (out / "README.md").read_text()
    assert "- lora" in card and "- diffit" in card


@pytest.mark.slow
def test_sigterm_to_accelerate_launch_saves_a_checkpoint_then_resume_matches_an_uninterrupted_run(
    train_assets, tmp_path
):
    """SIGTERM to the process group of a running `accelerate launch` (as Slurm sends it to every process of a job):
    the trainer finishes its step, saves checkpoint-<step>, exits with status 143; resuming it ends bit-exact (same
    process, same kernels: the test compares within 1e-6, as the SIGKILL test does)."""
    steps = 10
    extra = ["--train_batch_size", 2, "--max_train_steps", steps, "--checkpointing_steps", 2, "--use_ema"]
    extra += ["--ema_decay", 0.9, "--random_flip", "--learning_rate", 1e-3]
    run_in_process(train_diffit, latent_args(train_assets, tmp_path / "reference", *extra))
    out = tmp_path / "stopped"
    argv = [*latent_args(train_assets, out, *extra), "--resume_from_checkpoint", "latest"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", str(ROOT / "tests" / "kill_and_resume.py")]
    cmd += [str(EXAMPLES / "train_diffit.py"), *map(str, argv)]
    env = {**ENV, "DIFFIT_TEST_SLOW_SAVE": "0.2"}  # checkpoints take a second: the signal lands mid-run
    launcher = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    while not (out / "checkpoint-2").is_dir() and launcher.poll() is None:
        time.sleep(0.05)
    os.killpg(launcher.pid, signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=300)  # returns once the trainer, which holds the pipes, has exited
    stopped = re.search(r"Stopped by SIGTERM at step (\d+)", stderr)
    assert stopped, stderr[-3000:]
    step = int(stopped.group(1))
    assert step < steps and CheckpointManager(out, None).latest() == out / f"checkpoint-{step}"
    assert not (out / "model_index.json").exists()  # no pipeline yet: the run is not finished
    final = run_subprocess(argv)
    assert final.returncode == 0 and f"Resumed from {out / f'checkpoint-{step}'}" in final.stderr, final.stderr[-3000:]
    expected, got = read_run(tmp_path / "reference", steps), read_run(out, steps)
    worst = max((expected[k].double() - got[k].double()).abs().max().item() for k in expected)
    assert expected.keys() == got.keys() and worst <= 1e-6, f"max |Δ| = {worst} (stopped at step {step})"


@pytest.mark.slow
def test_two_cpu_processes_with_accelerate_launch(train_assets, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(EXAMPLES / "train_diffit.py"),
        *map(
            str,
            latent_args(
                train_assets,
                out,
                "--train_batch_size",
                2,
                "--max_train_steps",
                3,
                "--checkpointing_steps",
                3,
                "--use_ema",
                "--validation_steps",
                3,
                "--validation_inference_steps",
                2,
            ),
        ),
    ]
    result = subprocess.run(cmd, env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batch 2 × 2 processes" in result.stderr
    assert result.stderr.count("Saved the pipeline") == 1  # the main process writes the result, logs and grids
    assert {p.name for p in (out / "checkpoint-3").glob("random_states_*")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
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
