"""space_app/build_space.py: the Space folder it writes (YAML, pins, the package inside), the push through
huggingface_hub, and the folder deployed the way a Space build runs it: requirements.txt installed alone into a
fresh virtual environment, then `python app.py`, asked for an image through gradio_client."""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import SpaceCard, SpaceHardware
from PIL import Image

from diffusers_diffit import embedded_model_path
from diffusers_diffit.embedded import EMBEDDED_MODELS
from tests.utils import free_port, load_script


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def builder():
    return load_script(ROOT / "space_app" / "build_space.py")


def card(folder: Path):
    return SpaceCard.load(folder / "README.md").data


def test_default_space_is_complete_and_pinned(builder, tmp_path):
    folder = builder.build_space(tmp_path / "space")
    files = builder.space_files(folder)
    for name in [
        "app.py",
        "README.md",
        "requirements.txt",
        "space_config.json",
        "diffusers_diffit/__init__.py",
        "diffusers_diffit/pipelines/pipeline_diffit.py",
        "diffusers_diffit/data/imagenet_labels.json",
    ]:
        assert name in files
    for model in EMBEDDED_MODELS:  # both shipped models, every file of each
        shipped = Path(embedded_model_path(model))
        for path in shipped.rglob("*"):
            if path.is_file():
                assert f"diffusers_diffit/embedded/{model}/{path.relative_to(shipped)}" in files
    assert "diffusers_diffit/embedded/digits-latent/vae/config.json" in files
    assert not any("__pycache__" in name for name in files)
    assert (folder / "app.py").read_text() == (ROOT / "space_app" / "app.py").read_text()

    data = card(folder)
    import gradio

    assert data.sdk == "gradio" and data.sdk_version == gradio.__version__  # the gradio these tests run with
    assert data.python_version == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert data.app_file == "app.py" and data.title and data.emoji
    assert data.license == "apache-2.0" and data.models is None  # the shipped digits model: the package's licence
    assert len(data.short_description) <= 60
    assert data.suggested_hardware in {hardware.value for hardware in SpaceHardware}
    readme = (folder / "README.md").read_text()
    assert 'api_name="/generate"' in readme and 'model="digits-latent"' in readme
    assert "digits and digits-latent" in readme and "Model picker" in readme
    assert json.loads((folder / "space_config.json").read_text()) == {"model": None, "license": "apache-2.0"}


def test_requirements_are_pinned_to_what_the_tests_run_with(builder):
    pins = builder.read_pins()
    for name in ["gradio", "torch", "diffusers", "huggingface-hub"]:
        assert name in pins
    assert pins["gradio"] == importlib.metadata.version("gradio")  # = the README's sdk_version
    ci = {}  # what CI installs (constraints-ci.txt): the Space pins the same versions
    for line in (ROOT / "constraints-ci.txt").read_text().splitlines():
        name, _, version = line.split("#")[0].strip().partition("==")
        if version:
            ci[name.strip().lower().replace("_", "-")] = version.strip()
    for name in set(pins) & set(ci):
        assert pins[name] == ci[name], name
    assert "diffusers-diffit" not in pins  # not on any index: its source is in the folder


def test_unpinned_requirements_are_refused(builder, tmp_path):
    (tmp_path / "requirements.txt").write_text("gradio>=5\n")
    with pytest.raises(ValueError, match="must be pinned"):
        builder.read_pins(tmp_path / "requirements.txt")


def test_hub_model_space_names_the_model_and_its_licence(builder, tmp_path):
    folder = builder.build_space(tmp_path / "space", model="someone/DiffiT-XL-2-256")
    data = card(folder)
    assert data.models == ["someone/DiffiT-XL-2-256"] and data.license == "cc-by-nc-sa-4.0"
    assert data.suggested_hardware == "zero-a10g"
    assert json.loads((folder / "space_config.json").read_text())["model"] == "someone/DiffiT-XL-2-256"
    assert not (folder / "model").exists()
    assert 'model="someone/DiffiT-XL-2-256"' in (folder / "README.md").read_text()  # the one model it serves
    assert card(builder.build_space(tmp_path / "other", model="someone/x", license="mit")).license == "mit"


def test_local_model_folder_is_copied_in_with_its_card_licence(builder, tmp_path):
    model = tmp_path / "my-digits"
    shutil.copytree(embedded_model_path("digits"), model)
    (model / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n# my digits\n")
    folder = builder.build_space(tmp_path / "space", model=str(model))
    assert (folder / "model" / "model_index.json").is_file()
    assert card(folder).license == "cc-by-4.0" and card(folder).models is None
    assert json.loads((folder / "space_config.json").read_text())["model"] == "model"

    with pytest.raises(ValueError, match="not a diffusers pipeline"):
        builder.build_space(tmp_path / "bad", model=str(tmp_path))
    with pytest.raises(ValueError, match="Hub id"):
        builder.build_space(tmp_path / "bad", model="not a model")


def test_build_refuses_to_erase_a_folder_it_did_not_write(builder, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not erasing"):
        builder.build_space(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_dry_run_lists_files_and_commit_message_without_network(builder, tmp_path, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise AssertionError("--dry_run must not call the Hub")

    monkeypatch.setattr(huggingface_hub, "create_repo", no_network)
    monkeypatch.setattr(huggingface_hub, "upload_folder", no_network)
    builder.main(
        [
            "--output",
            str(tmp_path / "space"),
            "--push_to_hub",
            "me/diffit",
            "--dry_run",
            "--commit_message",
            "first version",
        ]
    )
    out = capsys.readouterr().out
    assert "me/diffit" in out and "'first version'" in out and "nothing uploaded" in out
    for name in ["app.py", "README.md", "requirements.txt", "diffusers_diffit/pipelines/pipeline_diffit.py"]:
        assert f"  {name}\n" in out
    assert 'Client("me/diffit")' in (tmp_path / "space" / "README.md").read_text()


def test_push_creates_a_gradio_space_and_uploads_the_folder(builder, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda *a, **k: calls.append(("create", a, k)) or "url")
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **k: calls.append(("upload", (), k)))
    builder.main(["--output", str(tmp_path / "space"), "--push_to_hub", "me/diffit", "--private"])
    (create, create_args, create_kwargs), (upload, _, upload_kwargs) = calls
    assert create_args == ("me/diffit",)
    assert create_kwargs["repo_type"] == "space" and create_kwargs["space_sdk"] == "gradio"
    assert create_kwargs["private"] is True and create_kwargs["exist_ok"] is True
    assert upload_kwargs["repo_type"] == "space" and upload_kwargs["repo_id"] == "me/diffit"
    assert Path(upload_kwargs["folder_path"]) == tmp_path / "space"


def wait_for(url: str, process: subprocess.Popen, log: Path, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"app.py exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"app.py did not answer at {url} within {seconds} s:\n{log.read_text()[-4000:]}")


@pytest.mark.slow
def test_built_space_runs_from_a_fresh_environment(builder, tmp_path):
    """As a Space build: install requirements.txt alone (from a copy outside the folder) into a fresh venv, copy the
    folder, run `python app.py`, get images of both shipped models through gradio_client. Installs from the package registries (the
    torch==2.13.0 pin takes the CPU wheel on disk here; ~1 min)."""
    from gradio_client import Client

    built = builder.build_space(tmp_path / "built")
    outside = tmp_path / "requirements"
    outside.mkdir()
    shutil.copy(built / "requirements.txt", outside / "requirements.txt")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", "requirements.txt"],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr[-4000:]

    space = tmp_path / "space"
    shutil.copytree(built, space)
    port = free_port()
    log = tmp_path / "app.log"
    env.update(
        GRADIO_SERVER_NAME="127.0.0.1",
        GRADIO_SERVER_PORT=str(port),
        HF_HUB_OFFLINE="1",
        GRADIO_ANALYTICS_ENABLED="False",
        GRADIO_TEMP_DIR=str(tmp_path / "gradio"),
    )
    with open(log, "w") as out:
        process = subprocess.Popen([str(python), "app.py"], cwd=space, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for(url, process, log)
        gallery, grid, seed = Client(url, verbose=False).predict(
            classes=["4"], images_per_class=2, seed=3, randomize_seed=False, api_name="/generate"
        )
        assert seed == 3 and [item["caption"] for item in gallery] == ["4", "4"]
        assert Path(gallery[0]["image"]).read_bytes().startswith(b"\x89PNG")
        gallery, _, _ = Client(url, verbose=False).predict(
            classes=["4"], images_per_class=1, steps=2, model="digits-latent", api_name="/generate"
        )
        assert Image.open(gallery[0]["image"]).size == (32, 32)
        assert "diffusers_diffit" not in subprocess.run(
            [str(python), "-m", "pip", "list"], capture_output=True, text=True, env=env
        ).stdout.replace("-", "_")  # it ran from the source in the folder, not from an installed package
    finally:
        process.terminate()
        process.wait(timeout=30)
