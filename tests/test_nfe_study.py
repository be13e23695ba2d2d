"""benchmarks/nfe_study.py on tiny in-process models: the discrete samplers, the official recipe, the digits judge
for 10-class models, and the report's "within seed noise" answer."""

import json
import sys

import numpy as np
import pytest
import torch

from benchmarks import nfe_study
from diffusers_diffit import DiffiTPipeline, embedded_model_path, official_scheduler
from diffusers_diffit.guidance import power_cosine_weight
from diffusers_diffit.schedulers.compatibility import COMPATIBLE
from tests.utils import named_model, tiny_vae


def save_tiny_pipeline(folder, num_classes: int = 10) -> str:
    """A latent DiffiT (ε + learned-range variance) on 8×8 latents of a 1-channel VAE (16-px images), with the
    official DDPM scheduler and a saved guidance w = 1.5: a discrete digits pipeline when `num_classes` is 10."""
    torch.manual_seed(0)
    transformer = named_model("tiny-transformer", num_classes=num_classes)
    vae = tiny_vae(channels=1)
    pipe = DiffiTPipeline(transformer, official_scheduler(), vae=vae, num_inference_steps=250, guidance_scale=1.5)
    pipe.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> str:
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_digits"))


@pytest.fixture(scope="module")
def base(digits_folder) -> DiffiTPipeline:
    return DiffiTPipeline.from_pretrained(digits_folder)


class FakeJudge:
    """Stands in for `DigitsJudge` (fitting it takes seconds): checks the ink it gets and returns fixed scores."""

    def __init__(self, train_ink, train_labels):
        pass

    def __call__(self, ink, labels):
        assert ink.shape == (len(labels), 8, 8) and np.isfinite(ink).all()
        return {"accuracy": 0.5, "fd_mlp": 1.0, "fd_pca": 0.1, "nn": 1.0}


@pytest.fixture
def study(monkeypatch, tmp_path):
    """`main(["run", ...])` with the fake judge and one thread, appending to a fresh results file -> its records."""
    monkeypatch.setattr(nfe_study, "DigitsJudge", FakeJudge)
    results = tmp_path / "results.jsonl"

    def run(*argv) -> list[dict]:
        nfe_study.main(["run", *argv, "--per-class", "1", "--results", str(results)])
        return nfe_study.load_records(results)

    return run


@pytest.mark.parametrize("name", list(nfe_study.DISCRETE_SAMPLERS))
def test_every_discrete_sampler_drives_a_ddpm_model_on_its_own_noise_schedule(base, name):
    pipe = nfe_study.sampler_pipeline(base, name)
    assert type(pipe.scheduler).__name__ in COMPATIBLE["ddpm"] and pipe.denoiser_type == "ddpm"
    assert torch.equal(pipe.scheduler.betas, base.scheduler.betas)  # built from the model's scheduler config
    assert pipe.scheduler.config.timestep_spacing == base.scheduler.config.timestep_spacing
    assert pipe._keeps_learned_variance() == (name == "ddpm")  # only DDPM's ancestral step reads v
    images = pipe([0, 7], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()


def test_ddpm_keeps_the_learned_variance_and_ddpm_fixed_ignores_it(base):
    assert nfe_study.sampler_pipeline(base, "ddpm").scheduler.config.variance_type == "learned_range"
    assert nfe_study.sampler_pipeline(base, "ddpm-fixed").scheduler.config.variance_type == "fixed_small"
    karras = nfe_study.sampler_pipeline(base, "dpmpp-3m-karras").scheduler.config
    assert karras.use_karras_sigmas and karras.solver_order == 3 and karras.algorithm_type == "dpmsolver++"
    with pytest.raises(ValueError, match="edm-heun"):
        nfe_study.sampler_pipeline(base, "edm-heun")


def test_run_scores_a_discrete_digits_model_with_the_digits_judge(study, digits_folder):
    samplers = list(nfe_study.DISCRETE_SAMPLERS)
    records = study(
        "--model", digits_folder, "--samplers", *samplers, "--calls", "2", "--guidance", "none", "full", "interval"
    )
    assert [r["sampler"] for r in records] == [name for name in samplers for _ in range(3)]
    for r in records:
        assert r["model"] == digits_folder and r["calls"] == 2 and r["recipe"]["name"] == "saved"
        assert r["fd_mlp"] == 1.0 and r["network_evals"] == 2 + r["guided_calls"]
    full = next(r for r in records if r["guidance"] == "full")
    assert full["guided_calls"] == 2 and full["recipe"]["guidance_scale"] == 1.5
    assert full["recipe"]["guidance_interval"] == "all"  # every step, whatever interval the pipeline saved


def test_run_accepts_the_shipped_model_names(study):
    assert nfe_study.model_path("digits-latent") == embedded_model_path("digits-latent")
    records = study(
        "--model", "digits-latent", "--samplers", "ddpm", "ddpm-fixed", "--calls", "2", "--guidance", "full"
    )
    assert [(r["model"], r["sampler"], r["calls"]) for r in records] == [
        ("digits-latent", "ddpm", 2),
        ("digits-latent", "ddpm-fixed", 2),
    ]


def test_official_recipe_guides_three_channels_with_the_power_cosine_ramp(study, digits_folder, monkeypatch):
    pipeline_module = sys.modules[DiffiTPipeline.__module__]
    guided = []  # (w, guided channels) of every guided call

    def spy(cond, uncond, weight, guided_channels):
        guided.append((weight, guided_channels))
        return apply_guidance(cond, uncond, weight, guided_channels)

    apply_guidance = pipeline_module.apply_guidance
    monkeypatch.setattr(pipeline_module, "apply_guidance", spy)
    argv = ("--model", digits_folder, "--recipe", "official", "--guidance-scale", "2", "--samplers", "ddpm")
    (record,) = study(*argv, "--calls", "3", "--guidance", "full")
    assert record["recipe"] == {
        "name": "official",
        "guidance_scale": 2.0,
        "guidance_schedule": "power-cosine",
        "guidance_power": 4.0,
        "guided_channels": 3,
        "guidance_interval": "all",
    }
    assert record["guided_calls"] == 3
    timesteps = [999, 500, 0]  # 3 of the 1000 training steps, linspace spacing
    assert guided == [(pytest.approx(power_cosine_weight(t, 2.0, 4.0, 1000)), 3) for t in timesteps]
    assert guided[-1][0] == 2.0


@pytest.mark.parametrize("argv", [("--recipe", "official"), ("--guidance-scale", "2")])
def test_guidance_scale_goes_with_the_official_recipe_only(study, digits_folder, argv):
    with pytest.raises(ValueError, match="--guidance-scale"):
        study("--model", digits_folder, *argv, "--samplers", "ddpm", "--calls", "2")


def test_a_discrete_model_that_is_not_a_digits_model_needs_a_reference(study, tmp_path):
    folder = save_tiny_pipeline(tmp_path / "five_classes", num_classes=5)
    with pytest.raises(ValueError, match="5 classes.*--reference"):
        study("--model", folder, "--samplers", "ddpm", "--calls", "2")


def test_edm_unipc_runs_through_the_pipeline_gate():
    base = DiffiTPipeline.from_pretrained(embedded_model_path("digits"))
    pipe = nfe_study.sampler_pipeline(base, "unipc-2")  # ε of the EDM denoiser for a VP-form UniPC
    images = pipe([3], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert images.shape == (1, 1, 16, 16) and torch.isfinite(images).all()


def write_records(path, rows, model="digits-latent", recipe="official"):
    """rows: (sampler, calls, seed, fd_mlp, accuracy) -> a results file of "full"-guidance records."""
    with open(path, "w") as f:
        for sampler, calls, seed, fd_mlp, accuracy in rows:
            record = {
                "model": model,
                "sampler": sampler,
                "steps": calls,
                "calls": calls,
                "guidance": "full",
                "guided_calls": calls,
                "network_evals": 2 * calls,
                "recipe": {"name": recipe},
                "seed": seed,
                "accuracy": accuracy,
                "fd_mlp": fd_mlp,
                "fd_pca": 0.1,
            }
            f.write(json.dumps(record) + "\n")


def test_report_names_the_fewest_calls_within_the_baselines_seed_noise(tmp_path, capsys):
    # baseline fd_mlp 1.0 ± 0.163 (std over 3 draws) -> limit 1.163; accuracy 95 % -> at least 94 %
    rows = [("ddpm", 250, s, fd, 0.95) for s, fd in enumerate([1.0, 1.2, 0.8])]
    rows += [("ddpm", 50, s, 1.4, 0.95) for s in range(3)]
    rows += [("ddim", 25, s, 1.5, 0.96) for s in range(3)]  # FD too high
    rows += [("ddim", 50, s, fd, 0.96) for s, fd in enumerate([1.0, 1.1, 1.2])]  # mean 1.1: within
    rows += [("ddim", 100, s, 1.0, 0.96) for s in range(3)]
    rows += [("dpmpp-2m", 12, s, 1.0, 0.90) for s in range(3)]  # FD fine, accuracy 5 points low
    rows += [("dpmpp-2m", 25, s, 1.15, 0.945) for s in range(3)]  # both within
    rows += [("euler", 25, s, 2.0, 0.95) for s in range(3)]
    write_records(tmp_path / "r.jsonl", rows)
    nfe_study.main(["report", "--results", str(tmp_path / "r.jsonl"), "--baseline", "ddpm", "full", "250"])
    out = capsys.readouterr().out
    assert out.startswith("digits-latent (official recipe)")
    assert "fd_mlp <= 1.163 (mean + 1 std over 3 draws), accuracy >= 94.0 %" in out
    summary = out.split("within seed noise of the baseline")[1].strip().splitlines()[1:]
    assert [line.split(" (")[0] for line in summary] == [
        "- ddim / full: 50 calls",
        "- ddpm / full: 250 calls",
        "- dpmpp-2m / full: 25 calls",
        "- euler / full: none of 25 calls",
    ]
    assert summary[0] == "- ddim / full: 50 calls (100 network evals / image; fd_mlp 1.100, accuracy 96.0 %; 3 draws)"


def test_report_refuses_a_file_that_mixes_recipes(tmp_path):
    write_records(tmp_path / "r.jsonl", [("ddpm", 250, 0, 1.0, 0.95)])
    write_records(tmp_path / "s.jsonl", [("ddpm", 250, 1, 1.0, 0.95)], recipe="saved")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text((tmp_path / "r.jsonl").read_text() + (tmp_path / "s.jsonl").read_text())
    with pytest.raises(ValueError, match="one model and recipe"):
        nfe_study.main(["report", "--results", str(mixed), "--baseline", "ddpm", "full", "250"])


def test_report_plot_ticks_include_the_large_call_counts(tmp_path, monkeypatch):
    figure = pytest.importorskip("matplotlib.figure")
    saved = []
    monkeypatch.setattr(figure.Figure, "savefig", lambda fig, path, **kwargs: saved.append(fig))
    write_records(
        tmp_path / "r.jsonl", [("ddpm", calls, s, 1 + 10 / calls, 0.95) for calls in (8, 25, 250) for s in (0, 1)]
    )
    argv = ["report", "--results", str(tmp_path / "r.jsonl"), "--baseline", "ddpm", "full", "250"]
    nfe_study.main([*argv, "--plot", str(tmp_path / "nfe.png")])
    assert list(saved[0].axes[0].get_xticks()) == [8, 10, 12, 18, 25, 35, 50, 100, 250]
