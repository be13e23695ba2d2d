"""Every JSON file the package ships or writes parses with a strict parser (no NaN / Infinity, which Python's json
writes by default and JavaScript, Rust and Go parsers reject), and `dtype=` / `torch_dtype=` are one option."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from safetensors.torch import save_file

from diffusers_diffit import DiffiTPipeline, EDMHeunScheduler, embedded_model_path
from tests.utils import make_pipe, official_layout_checkpoint, tiny_transformer, tiny_vae


PACKAGE = Path(embedded_model_path("digits")).parents[1]


def strict_load(path: Path):
    def reject(constant):
        raise ValueError(f"{path}: {constant} is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=reject)


def test_strict_parser_rejects_what_python_writes_by_default(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"s_tmax": float("inf")}))
    with pytest.raises(ValueError, match="Infinity is not JSON"):
        strict_load(tmp_path / "bad.json")


def test_every_json_file_the_package_ships_is_strict():
    files = sorted(PACKAGE.rglob("*.json"))
    assert len(files) >= 4  # model_index, transformer and scheduler configs, ImageNet labels
    for path in files:
        strict_load(path)


@pytest.mark.parametrize("scheduler", [EDMHeunScheduler(), EDMHeunScheduler(s_churn=40, s_tmin=0.05)])
def test_a_fresh_save_is_strict(tmp_path, scheduler):
    pipe = make_pipe(
        tiny_transformer(in_channels=3, learned_sigma=False),
        scheduler,
        vae=None,
        guidance_scale=2.0,
        guidance_interval=(-1.5, 2.5),
    )
    pipe.save_pretrained(tmp_path)
    files = sorted(tmp_path.rglob("*.json"))
    assert {p.relative_to(tmp_path).as_posix() for p in files} == {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "transformer/config.json",
    }
    for path in files:
        strict_load(path)
    assert strict_load(tmp_path / "scheduler" / "scheduler_config.json")["s_tmax"] is None


def test_single_file_pipeline_takes_dtype_and_torch_dtype(tmp_path):
    save_file(official_layout_checkpoint(), tmp_path / "diffit.safetensors")
    for kwargs in (dict(dtype=torch.bfloat16), dict(torch_dtype=torch.bfloat16)):
        pipe = DiffiTPipeline.from_single_file(
            tmp_path / "diffit.safetensors", vae=tiny_vae(), image_size=256, **kwargs
        )
        assert pipe.transformer.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"`dtype` \(torch.float16\) and `torch_dtype` \(torch.bfloat16\) disagree"):
        DiffiTPipeline.from_single_file(
            tmp_path / "diffit.safetensors", vae=tiny_vae(), dtype=torch.float16, torch_dtype=torch.bfloat16
        )
    with pytest.raises(ValueError, match="`dtype` must be a torch.dtype"):
        DiffiTPipeline.from_single_file(tmp_path / "diffit.safetensors", vae=tiny_vae(), dtype="fp16")


def test_a_scheduler_with_infinite_defaults_saves_strict_json_and_reloads_them(tmp_path):
    """DPM-Solver's `lambda_min_clipped` defaults to -inf: the saved config leaves it out, loading restores it."""
    scheduler = DPMSolverMultistepScheduler(variance_type=None)
    pipe = make_pipe(tiny_transformer(in_channels=3, learned_sigma=False), scheduler, vae=None)
    pipe.save_pretrained(tmp_path)
    config = strict_load(tmp_path / "scheduler" / "scheduler_config.json")
    assert "lambda_min_clipped" not in config and config["_class_name"] == "DPMSolverMultistepScheduler"
    assert DiffiTPipeline.from_pretrained(tmp_path).scheduler.config.lambda_min_clipped == -float("inf")
