"""conversion/convert_diffit_to_diffusers.py end to end on a random checkpoint in NVIDIA's key layout, and the Hub
helpers it uses (model card, upload plan). Offline: the VAE is a tiny local folder, uploads go to a fake HfApi."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from diffusers_diffit import hub
from diffusers_diffit.labels import imagenet_id2label
from diffusers_diffit.pipelines import DiffiTPipeline
from tests.utils import CONVERTER, DIM, load_script


@pytest.fixture(autouse=True)
def no_hub_uploads(monkeypatch):
    class Offline:
        def __init__(self, *args, **kwargs):
            raise AssertionError("this test must not reach the Hub")

    monkeypatch.setattr(hub, "HfApi", Offline)


def test_conversion_writes_a_complete_verified_pipeline(conversion_inputs, tmp_path, capsys):
    checkpoint, vae, state = conversion_inputs
    out = tmp_path / "DiffiT-tiny"
    load_script(CONVERTER).main(
        ["--checkpoint_path", str(checkpoint), "--output_path", str(out), "--vae", str(vae), "--image_size", "256"]
    )

    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "DiffiTPipeline" and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert (
        index["num_inference_steps"],
        index["guidance_scale"],
        index["guidance_schedule"],
        index["guidance_power"],
        index["guided_channels"],
    ) == (250, 4.4, "power-cosine", 4.0, 3)
    assert index["id2label"]["207"] == ["golden retriever"] and len(index["id2label"]) == 1000

    pipe = DiffiTPipeline.from_pretrained(out)
    scheduler = pipe.scheduler
    assert isinstance(scheduler, DDPMScheduler)
    assert (
        scheduler.config.variance_type,
        scheduler.config.clip_sample,
        scheduler.config.timestep_spacing,
        scheduler.config.beta_start,
        scheduler.config.beta_end,
    ) == ("learned_range", False, "linspace", 1e-4, 0.02)
    assert pipe.id2label == imagenet_id2label()
    # the official tensors landed where they belong: q, k, v split in that order, names mapped
    blocks = pipe.transformer.transformer_blocks
    for i, name in enumerate("qkv"):
        rows = slice(i * DIM, (i + 1) * DIM)
        assert torch.equal(getattr(blocks[1].attn, f"to_{name}").weight, state["blocks.1.attn.qkv.weight"][rows])
        assert torch.equal(getattr(blocks[0].attn, f"to_{name}_time").bias, state["blocks.0.attn.qkv_temb.bias"][rows])
    assert torch.equal(pipe.transformer.proj_out.weight, state["final_layer.linear.weight"])
    images = pipe(
        "golden retriever", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and card.data.license == "cc-by-nc-sa-4.0"
    assert card.data.base_model == "nvidia/DiffiT" and "diffit" in card.data.tags
    assert "from diffusers_diffit import DiffiTPipeline" in card.text and f'from_pretrained("{out}"' in card.text
    assert (
        "| 1.73 | 4.54 | 276.49 | 0.802 | 0.621 |" in card.text and "@inproceedings{hatamizadeh2024diffit" in card.text
    )
    assert "the first 3 of the 4 latent channels, the power-cosine schedule w(t) = 1 + (w − 1)" in card.text
    assert "(w = 4.4, p = 4, T = 1000)." in card.text
    assert "Would upload" not in capsys.readouterr().out


def test_dry_run_lists_the_upload_without_network(conversion_inputs, tmp_path, capsys):
    checkpoint, vae, _ = conversion_inputs
    out = tmp_path / "converted"
    load_script(CONVERTER).main(
        [
            "--checkpoint_path",
            str(checkpoint),
            "--output_path",
            str(out),
            "--vae",
            str(vae),
            "--image_size",
            "512",
            "--dtype",
            "bf16",
            "--push_to_hub",
            "someone/DiffiT-tiny",
            "--dry_run",
        ]
    )
    printed = capsys.readouterr().out
    assert (
        "Would upload to someone/DiffiT-tiny with commit message 'DiffiT 512px converted to diffusers (bf16)'"
        in printed
    )
    assert "  transformer/diffusion_pytorch_model.safetensors" in printed and "  README.md" in printed
    card = ModelCard.load(out / "README.md")
    assert (
        'from_pretrained("someone/DiffiT-tiny"' in card.text
        and "| 2.67 | 4.99 | 252.13 | 0.828 | 0.550 |" in card.text
    )
    index = json.loads((out / "model_index.json").read_text())
    assert (index["guidance_scale"], index["guidance_schedule"]) == (1.49, "constant")
    assert "the constant schedule w(t) = w at every step (w = 1.49)." in card.text
    weights = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


def test_conversion_arguments_are_checked(conversion_inputs, tmp_path):
    checkpoint, vae, _ = conversion_inputs
    script = load_script(CONVERTER)
    base = ["--checkpoint_path", str(checkpoint), "--output_path", str(tmp_path / "x"), "--vae", str(vae)]
    with pytest.raises(ValueError, match=r"`image_size` must be one of \[256, 512\], got 16"):
        script.main(base)  # a 16-px toy: the recipe must be chosen explicitly
    with pytest.raises(SystemExit):
        script.main([*base, "--dry_run"])  # needs --push_to_hub
    with pytest.raises(SystemExit):
        script.main([*base, "--image_size", "384"])
    with pytest.raises(SystemExit):
        script.main([*base, "--dtype", "fp64"])
    assert script.parse_args([*base, "--dtype", "bfloat16"]).dtype == "bf16"  # torch's spelling is accepted too
    assert not (tmp_path / "x").exists()


def test_image_size_must_match_an_official_checkpoint(conversion_inputs):
    checkpoint = conversion_inputs[0]
    # a VAE that downsamples ×32 turns the 8×8 latents into 256-px images: an official size, so it must agree
    vae = AutoencoderKL(
        block_out_channels=(4,) * 6,
        down_block_types=("DownEncoderBlock2D",) * 6,
        up_block_types=("UpDecoderBlock2D",) * 6,
        latent_channels=4,
        norm_num_groups=4,
    )
    with pytest.raises(ValueError, match=r"`image_size` 512 does not match the checkpoint, which makes 256-px"):
        DiffiTPipeline.from_single_file(checkpoint, vae=vae, image_size=512)
    assert DiffiTPipeline.from_single_file(checkpoint, vae=vae).config.guidance_schedule == "power-cosine"


# ---------------------------------------------------------------------------------------------------------------
# Hub helpers


def test_model_card_keeps_existing_metadata_and_does_not_repeat_tags(tmp_path):
    card = hub.create_model_card(tmp_path, "# First", license="mit", base_model="a/b", tags=["x", "y", "x"])
    assert card.data.library_name == "diffusers" and card.data.tags == ["x", "y"] and card.text.strip() == "# First"
    card.data.datasets = ["imagenet-1k"]
    card.save(tmp_path / "README.md")
    again = hub.create_model_card(tmp_path, "# Second", license="cc-by-nc-sa-4.0", tags=["y", "z"])
    assert again.data.tags == ["x", "y", "z"] and again.data.datasets == ["imagenet-1k"]
    assert again.data.license == "cc-by-nc-sa-4.0" and again.data.base_model == "a/b"
    assert again.text.strip() == "# Second"


def test_push_to_hub_uploads_one_commit(tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls.append(("create_repo", repo_id, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message, ignore_patterns):
            calls.append(("upload_folder", repo_id, Path(folder_path), commit_message, ignore_patterns))
            return type("Commit", (), {"commit_url": "https://hub/commit/1"})()

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / "state.bin").write_text("x")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("x")

    plan = hub.push_to_hub(
        tmp_path,
        "me/model",
        commit_message="End of training",
        private=True,
        token="t",
        ignore_patterns=["checkpoint-*"],
        dry_run=True,
    )
    assert plan.files == ["unet/config.json"] and plan.commit_url is None and calls == []

    plan = hub.push_to_hub(
        tmp_path,
        "me/model",
        commit_message="End of training",
        private=True,
        token="t",
        ignore_patterns=["checkpoint-*"],
    )
    assert plan.commit_url == "https://hub/commit/1"
    assert calls == [
        ("token", "t"),
        ("create_repo", "me/model", True, True),
        ("upload_folder", "me/model", tmp_path, "End of training", ["checkpoint-*"]),
    ]
    with pytest.raises(ValueError, match="`folder` must be an existing directory"):
        hub.push_to_hub(tmp_path / "missing", "me/model")
