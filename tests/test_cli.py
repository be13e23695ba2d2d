"""The `diffit` console script as a user runs it: a subprocess per command line. Mistakes end with one line on
stderr naming the option and what is allowed, exit status 2, no traceback and no output file, before any model is
loaded; good commands write the grid."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_diffit.cli import main as cli_main
from diffusers_diffit.guidance import GUIDANCE_SCHEDULES
from tests.utils import make_pipe


OFFLINE = {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run_cli(*argv: str, cwd: Path) -> tuple[int, str]:
    """`python -m diffusers_diffit.cli ARGV` -> (exit status, stderr)."""
    process = subprocess.run(
        [sys.executable, "-m", "diffusers_diffit.cli", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE},
        timeout=300,
    )
    return process.returncode, process.stderr


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory) -> Path:
    """A saved latent pipeline of the released kind (DDPM, learned variance, 10 classes, no names)."""
    folder = tmp_path_factory.mktemp("ddpm") / "pipe"
    make_pipe(guidance_scale=1.5, num_inference_steps=4).save_pretrained(folder)
    return folder


BAD = [  # (arguments, option named in the one-line message, words of the message)
    (["--labels", "10"], "--labels", "invalid class id 10: must be in [0, 9]"),
    (["--labels", "-1"], "--labels", "invalid class id -1"),
    (["--labels", "foo"], "--labels", "Unknown class label 'foo'"),
    (["--labels", "1", "two"], "--labels", "names: 0, 1, 2"),
    (["--steps", "0"], "--steps", "must be >= 1"),
    (["--steps", "2.5"], "--steps", "an integer is required"),
    (["--guidance-scale", "-2"], "--guidance-scale", "finite number >= 1"),
    (["--guidance-scale", "nan"], "--guidance-scale", "'nan'"),
    (["--guidance-scale", "inf"], "--guidance-scale", "'inf'"),
    (["--num-images-per-label", "0"], "--num-images-per-label", "in [1, 1024]"),
    (["--labels", "1", "2", "--num-images-per-label", "1000"], "--num-images-per-label", "2000 images"),
    (["--model", "./nonexistent"], "--model", "no such folder './nonexistent'"),
    (["--model", ""], "--model", "empty value"),
    (["--model", "someone/no-such-repo"], "--model", "neither a local folder nor a Hub repo"),
    (["--output", "g"], "--output", "no image extension"),
    (["--output", "some_dir/"], "--output", "is a directory"),
    (["--output", "/proc/grid.png"], "--output", "not a writable directory"),
    (["--upscale", "-2"], "--upscale", "in [1, 64]"),
    (["--guidance-interval", "0.5"], "--guidance-interval", "give LOW HIGH"),
    (["--guidance-interval", "1", "nan"], "--guidance-interval", "give LOW HIGH"),
    (["--scheduler", "ddim"], "--scheduler", "cannot drive this 'edm' model"),
    (["--scheduler", "nope"], "--scheduler", "invalid choice: 'nope'"),
    (["--guidance-schedule", "cosine"], "--guidance-schedule", "invalid choice: 'cosine'"),
    (["--guidance-schedule", "power-cosine"], "--guidance-schedule", "'power-cosine' needs a discrete-time scheduler"),
    (["--seed", "123456789012345678901234"], "--seed", "must be in [0, 18446744073709551615]"),
    (["--seed", "-1"], "--seed", "must be in [0,"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device", "CUDA"),
    (["--device", "gpu"], "--device", "invalid device 'gpu'"),
    (["--labels", "1", "--bogus"], None, "unrecognized arguments: --bogus"),
]


# Mistakes that reach a model, the Hub client or torch's device query, and one argparse catches: these run in a fresh
# Python process each, where a warning printed at import or load time would show as a second line.
IN_A_FRESH_PROCESS = {"--bogus", "someone/no-such-repo", "ddim", "cuda:0", "cuda:99"}


def check_one_line_mistake(argv, option, words, returncode, stderr):
    lines = stderr.strip().splitlines()
    assert returncode == 2, (argv, stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, (argv, stderr)
    prefix = f"diffit sample: error: argument {option}: " if option else "diffit: error: "  # argparse's own
    assert lines[0].startswith(prefix) and words in lines[0], (argv, lines[0])


def test_every_mistake_is_one_line_with_exit_status_2(tmp_path, monkeypatch, capfd):
    """The same `main` the console script calls, in this process (capturing file descriptor 2, so logging and
    warnings count too); the mistakes that get further run as `python -m diffusers_diffit.cli` in fresh processes."""
    monkeypatch.chdir(tmp_path)
    fresh = [case for case in BAD if IN_A_FRESH_PROCESS & set(case[0])]
    with ThreadPoolExecutor(2) as pool:
        results = pool.map(lambda argv: run_cli("sample", *argv, cwd=tmp_path), [argv for argv, *_ in fresh])
        for (argv, option, words), (returncode, stderr) in zip(fresh, results):
            check_one_line_mistake(argv, option, words, returncode, stderr)
    for argv, option, words in BAD:
        if (argv, option, words) in fresh:
            continue
        capfd.readouterr()
        try:
            returncode = cli_main(["sample", *argv])
        except SystemExit as exit:  # argparse's Parser.error
            returncode = exit.code
        check_one_line_mistake(argv, option, words, returncode, capfd.readouterr().err)
    assert not list(tmp_path.rglob("*.*")), "no output file after a mistake"


def test_mistakes_against_a_converted_latent_pipeline(imagenet_like, tmp_path):
    runs = {
        "edm scheduler": (["--scheduler", "edm-euler"], "cannot drive this 'ddpm' model; choose from ddpm, ddim"),
        "too many steps": (["--steps", "1001"], "at most 1000 steps"),
        "folder without a pipeline": (["--model", str(tmp_path)], "not a pipeline (no model_index.json"),
    }
    for name, (argv, words) in runs.items():
        model = [] if "--model" in argv else ["--model", str(imagenet_like)]
        returncode, stderr = run_cli("sample", *model, *argv, "--output", str(tmp_path / "x.png"), cwd=tmp_path)
        assert returncode == 2 and len(stderr.strip().splitlines()) == 1, (name, stderr)
        assert words in stderr, (name, stderr)
    assert not (tmp_path / "x.png").exists()


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(imagenet_like, tmp_path):
    (imagenet_like.parent / "broken").mkdir()
    broken = imagenet_like.parent / "broken" / "pipe"
    shutil.copytree(imagenet_like, broken)
    # A config diffusers itself rejects with an error that is not a usage mistake (damaged files are: exit 2).
    config = broken / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "beta_schedule": "not-a-schedule"}))
    args = ["sample", "--model", str(broken), "--labels", "1", "--output", str(tmp_path / "a.png")]
    returncode, stderr = run_cli(*args, cwd=tmp_path)
    assert returncode == 1 and "Traceback" not in stderr and "--debug" in stderr.strip().splitlines()[-1]
    returncode, stderr = run_cli("--debug", *args, cwd=tmp_path)
    assert returncode == 1 and "Traceback" in stderr
    assert not (tmp_path / "a.png").exists()


def test_writes_a_grid_one_row_per_label(tmp_path):
    output = tmp_path / "out" / "grid.png"
    assert (
        cli_main(
            [
                "sample",
                "--labels",
                "3",
                "1",
                "4",
                "--num-images-per-label",
                "2",
                "--steps",
                "3",
                "--output",
                str(output),
            ]
        )
        == 0
    )
    grid = Image.open(output)
    assert grid.size == (2 * 64 + 2, 3 * 64 + 2 * 2)  # 16-px digits zoomed 4x, 2-px gaps; one row per label
    assert np.asarray(grid).std() > 0 and not list(output.parent.glob(".*partial"))


def test_samples_the_shipped_latent_model_by_name(tmp_path):
    output = tmp_path / "grid.png"
    argv = ["sample", "--model", "digits-latent", "--labels", "7", "--num-images-per-label", "2"]
    assert cli_main([*argv, "--steps", "3", "--output", str(output)]) == 0
    grid = Image.open(output)
    assert grid.size == (2 * 32 * 2 + 2, 32 * 2)  # 32-px digits decoded by the VAE, zoomed 2x, 2-px gaps
    assert np.asarray(grid).std() > 0


def test_scheduler_presets_are_built_for_the_loaded_model(imagenet_like, tmp_path):
    """`--scheduler dpmsolver` on a converted latent pipeline (DDPM config with the learned variance) works: the
    preset is built with variance_type=None. EDM presets work on the digits model."""
    assert (
        cli_main(
            [
                "sample",
                "--model",
                str(imagenet_like),
                "--labels",
                "1",
                "2",
                "--num-images-per-label",
                "1",
                "--scheduler",
                "dpmsolver",
                "--steps",
                "3",
                "--output",
                str(tmp_path / "dpm.jpg"),
            ]
        )
        == 0
    )
    assert Image.open(tmp_path / "dpm.jpg").format == "JPEG"
    assert (
        cli_main(
            [
                "sample",
                "--labels",
                "5",
                "--num-images-per-label",
                "1",
                "--steps",
                "3",
                "--scheduler",
                "edm-euler",
                "--upscale",
                "1",
                "--output",
                str(tmp_path / "euler.png"),
            ]
        )
        == 0
    )
    assert Image.open(tmp_path / "euler.png").size == (16, 16)
    # the digits model's earlier recipe: EDM Heun, 18 steps (35 calls), guidance at every step
    assert (
        cli_main(
            [
                "sample",
                "--labels",
                "5",
                "--num-images-per-label",
                "1",
                "--scheduler",
                "edm-heun",
                "--steps",
                "18",
                "--guidance-interval",
                "all",
                "--output",
                str(tmp_path / "heun.png"),
            ]
        )
        == 0
    )


def test_guidance_schedule_reaches_the_pipeline(imagenet_like, tmp_path, monkeypatch):
    calls = []
    schedule = GUIDANCE_SCHEDULES["power-cosine"]
    spy = dataclasses.replace(schedule, weight=lambda *args: calls.append(args) or schedule.weight(*args))
    monkeypatch.setitem(GUIDANCE_SCHEDULES, "power-cosine", spy)
    assert (
        cli_main(
            [
                "sample",
                "--model",
                str(imagenet_like),
                "--labels",
                "1",
                "--num-images-per-label",
                "1",
                "--steps",
                "3",
                "--guidance-schedule",
                "power-cosine",
                "--output",
                str(tmp_path / "g.png"),
            ]
        )
        == 0
    )
    assert [(guidance_scale, horizon) for _, guidance_scale, _, horizon in calls] == [(1.5, 1000)] * 3


def test_help_lists_the_options_and_presets():
    process = subprocess.run(
        [sys.executable, "-m", "diffusers_diffit.cli", "sample", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE},
        timeout=120,
    )
    assert process.returncode == 0
    for words in (
        "--labels",
        "--scheduler",
        "edm-heun",
        "dpmsolver",
        "--debug",
        "--seed",
        "--device",
        "--guidance-schedule",
    ):
        assert words in process.stdout
