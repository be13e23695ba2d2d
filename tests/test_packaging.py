"""The distributions: `python -m build` makes an sdist and a wheel that hold both shipped models (the wheel under
10 MB), the ImageNet label table and py.typed, and pass `twine check`; a fresh virtual environment with only the wheel
(and its dependencies, pinned by constraints-ci.txt) runs `diffit sample` and imports every public name.

`make dist` builds into dist/ and runs this file on those files (DIFFIT_DIST=dist); otherwise the distributions are
built here. Takes about a minute: the fresh environment installs torch from the local CPU wheel."""

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
DATA_FILES = [
    "diffusers_diffit/py.typed",
    "diffusers_diffit/data/imagenet_labels.json",
    "diffusers_diffit/embedded/digits/model_index.json",
    "diffusers_diffit/embedded/digits/scheduler/scheduler_config.json",
    "diffusers_diffit/embedded/digits/transformer/config.json",
    "diffusers_diffit/embedded/digits/transformer/diffusion_pytorch_model.safetensors",
    "diffusers_diffit/embedded/digits-latent/model_index.json",
    "diffusers_diffit/embedded/digits-latent/scheduler/scheduler_config.json",
    "diffusers_diffit/embedded/digits-latent/transformer/config.json",
    "diffusers_diffit/embedded/digits-latent/transformer/diffusion_pytorch_model.safetensors",
    "diffusers_diffit/embedded/digits-latent/vae/config.json",
    "diffusers_diffit/embedded/digits-latent/vae/diffusion_pytorch_model.safetensors",
]
MAX_WHEEL_BYTES = 10_000_000  # both shipped models included
IMPORT_CHECK = """
import importlib, pkgutil, sys
import diffusers_diffit
assert "site-packages" in diffusers_diffit.__file__, diffusers_diffit.__file__
names = [f"diffusers_diffit.{n}" for n in diffusers_diffit.__all__ if getattr(diffusers_diffit, n) is not None]
for package in pkgutil.walk_packages(diffusers_diffit.__path__, "diffusers_diffit."):
    if package.ispkg:
        module = importlib.import_module(package.name)
        names += [f"{package.name}.{n}" for n in getattr(module, "__all__", []) if getattr(module, n) is not None]
print(len(names), "public names")
"""

pytestmark = pytest.mark.slow


def run(*command, cwd=None, env=None, timeout=600):
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, command))}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def distributions(tmp_path_factory) -> tuple[Path, Path]:
    folder = os.environ.get("DIFFIT_DIST")
    if folder is None:
        folder = tmp_path_factory.mktemp("dist")
        # --no-isolation: the build backend of this environment (setuptools, a test requirement), no download
        run(sys.executable, "-m", "build", "--no-isolation", "--outdir", str(folder), str(ROOT), cwd=ROOT)
    wheels, sdists = sorted(Path(folder).glob("*.whl")), sorted(Path(folder).glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, (wheels, sdists)
    return wheels[0], sdists[0]


def test_distributions_hold_the_package_and_its_data(distributions):
    wheel, sdist = distributions
    assert wheel.stat().st_size < MAX_WHEEL_BYTES, wheel.stat().st_size
    wheel_files = set(zipfile.ZipFile(wheel).namelist())
    sdist_root = sdist.name.removesuffix(".tar.gz")
    sdist_files = {name.removeprefix(f"{sdist_root}/") for name in tarfile.open(sdist).getnames()}
    for name in DATA_FILES:
        assert name in wheel_files, name
        assert name in sdist_files, name
    # every package of the source tree (pipelines/ is installed as diffusers_diffit.pipelines)
    sources = [p.relative_to(ROOT).as_posix() for p in (ROOT / "diffusers_diffit").rglob("*.py")]
    sources += [f"diffusers_diffit/{p.relative_to(ROOT).as_posix()}" for p in (ROOT / "pipelines").glob("*.py")]
    assert not [s for s in sources if s not in wheel_files], "modules missing from the wheel (setup.cfg `packages`)"
    dist_info = wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"
    assert f"{dist_info}/licenses/LICENSE" in wheel_files and "LICENSE" in sdist_files
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    for field in (
        "License: Apache-2.0",
        "License-File: LICENSE",
        "Keywords:",
        "Project-URL: Paper, https://arxiv.org/abs/2312.02139",
        "Classifier: Typing :: Typed",
        "Requires-Dist: diffusers<0.43,>=0.42",
    ):
        assert field in metadata, field
    output = run(sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist))
    assert output.count("PASSED") == 2, output


def test_wheel_alone_samples_and_imports_in_a_fresh_environment(distributions, tmp_path):
    wheel, _ = distributions
    env_dir = tmp_path / "venv"
    run(sys.executable, "-m", "venv", str(env_dir))
    python = env_dir / "bin" / "python"
    # one resolve: the pinned CPU torch (as `make setup` installs it) and the wheel with its dependencies
    run(
        str(python),
        "-m",
        "pip",
        "--disable-pip-version-check",
        "-q",
        "install",
        "--no-compile",
        "-c",
        str(ROOT / "constraints-ci.txt"),
        "torch==2.13.0",
        str(wheel),
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    env.pop("PYTHONPATH", None)
    run(
        str(env_dir / "bin" / "diffit"),
        "sample",
        "--labels",
        "3",
        "1",
        "--num-images-per-label",
        "2",
        "--steps",
        "2",
        "--output",
        "grid.png",
        cwd=tmp_path,
        env=env,
    )
    from PIL import Image

    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (2 * 64 + 2, 2 * 64 + 2)  # 2×2 digits of 16 px, zoomed ×4, 2-px gaps
    assert "public names" in run(str(python), "-c", IMPORT_CHECK, cwd=tmp_path, env=env)
