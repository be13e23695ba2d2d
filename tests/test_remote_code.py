"""Hub-native repos: DiffiT folders with code generated from the package load in plain diffusers
(`trust_remote_code=True`, `DiffusionPipeline` and `AutoModel`) in a process where diffusers_diffit cannot be imported,
and sample exactly what the package samples; with the package imported, diffusers gives the package's own classes for
every DiffiT folder, with or without code. Tiny models, CPU, offline."""

import ast
import importlib.metadata
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoModel, DiffusionPipeline
from diffusers.utils import dynamic_modules_utils
from diffusers.utils.dynamic_modules_utils import get_relative_imports
from huggingface_hub import ModelCard
from safetensors import safe_open

import diffusers_diffit
from diffusers_diffit import DiffiTPipeline, DiffiTUNet2DModel, EDMHeunScheduler, embedded_model_path, hub
from diffusers_diffit.models import DiffiTTransformer2DModel
from diffusers_diffit.remote_code import (
    ALLOWED_IMPORTS,
    check_generated_imports,
    generate_module_file,
    generated_from,
    remote_code_requirements,
    stale_remote_code_files,
)
from tests.utils import CONVERTER, load_script, make_pipe, named_model, run_isolated_python


pytestmark = pytest.mark.usefixtures("one_thread")

CHILD = Path(__file__).with_name("remote_code_child.py")
LATENT_CALL = {"class_labels": [207, "tiger cat"], "num_inference_steps": 3}
PIXEL_CALL = {"class_labels": [3, 1], "num_inference_steps": 3}


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records the calls, sends nothing."""

    calls: list = []

    def __init__(self, token=None):
        self.calls.append(("HfApi", token))

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, repo_id, folder_path, commit_message, ignore_patterns):
        files = sorted(p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file())
        self.calls.append(("upload_folder", repo_id, commit_message, files))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"})()


@pytest.fixture(scope="module")
def latent_repo(conversion_inputs, tmp_path_factory):
    """The converter's output with --remote_code for a tiny official-layout checkpoint, pushed to a recording HfApi."""
    checkpoint, vae, _ = conversion_inputs
    out = tmp_path_factory.mktemp("latent") / "DiffiT-tiny"
    RecordingApi.calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hub, "HfApi", RecordingApi)
        load_script(CONVERTER).main(
            [
                "--checkpoint_path",
                str(checkpoint),
                "--output_path",
                str(out),
                "--vae",
                str(vae),
                "--image_size",
                "256",
                "--remote_code",
                "--sample_grid",
                "--sample_labels",
                "207",
                "tench",
                "--sample_steps",
                "2",
                "--push_to_hub",
                "someone/DiffiT-tiny",
            ]
        )
    return out, list(RecordingApi.calls)


@pytest.fixture(scope="module")
def pixel_repo(tmp_path_factory):
    """A tiny class-conditional image-space DiffiT with the package's EDM scheduler, saved with remote code."""
    torch.manual_seed(0)
    unet = named_model("tiny-unet", sample_size=8, block_out_channels=(16, 32))
    pipe = DiffiTPipeline(unet, EDMHeunScheduler(), id2label={i: [str(i)] for i in range(10)}, guidance_scale=1.5)
    out = tmp_path_factory.mktemp("pixel") / "DiffiT-pixel"
    pipe.save_pretrained(out, remote_code=True)
    return out


def run_without_package(folder: Path, call: dict, tmp_path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Load `folder` with plain diffusers in a fresh `python -I` process that cannot import diffusers_diffit."""
    out = tmp_path / "child.safetensors"
    run_isolated_python(str(CHILD), str(folder), str(out), json.dumps(call), cwd=tmp_path)
    with safe_open(out, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["report"])


def package_outputs(folder: Path, call: dict) -> dict[str, torch.Tensor]:
    """The same computations as remote_code_child.py, with the package's classes."""
    pipe = DiffiTPipeline.from_pretrained(folder)
    images = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="pt").images
    model, cfg = pipe.transformer, pipe.transformer.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, cfg.num_classes]) if cfg.num_classes else None
    with torch.no_grad():
        forward = model(x, torch.tensor([3.0, 0.5]), class_labels=labels, return_dict=False)[0]
    return {"images": images, "forward": forward}


@pytest.mark.parametrize("kind", ["latent", "pixel"])
def test_plain_diffusers_loads_and_samples_like_the_package(kind, latent_repo, pixel_repo, tmp_path):
    folder, call = (latent_repo[0], LATENT_CALL) if kind == "latent" else (pixel_repo, PIXEL_CALL)
    child, report = run_without_package(folder, call, tmp_path)
    expected = package_outputs(folder, call)

    model_class = {"latent": "transformer_diffit.DiffiTTransformer2DModel", "pixel": "unet_diffit.DiffiTUNet2DModel"}[
        kind
    ]
    assert report["pipeline"] == "diffusers_modules.local.pipeline_diffit.DiffiTPipeline"
    assert report["automodel"] == f"diffusers_modules.local.{model_class}"
    assert report["components"]["transformer"] == f"diffusers_modules.local.{model_class.split('.')[0]}"
    if kind == "pixel":
        assert report["components"]["scheduler"] == "diffusers_modules.local.scheduling_edm_heun"
    assert report["diffusers_diffit_modules"] == []
    if kind == "latent":
        needs_package = "`DiffiTTransformer2DModel.from_single_file` needs the diffusers-diffit package"
        assert needs_package in report["from_single_file"]
    for key in ("images", "forward"):
        assert child[key].shape == expected[key].shape and child[key].dtype == torch.float32
        difference = (child[key] - expected[key]).abs().max().item()
        print(f"{kind} {key}: max |remote code − package| = {difference:.3g}")
        assert difference <= 1e-6, (kind, key, difference)
    assert expected["images"].std() > 0.01  # a real image, not a constant


def test_repo_layout_and_generated_code(latent_repo, pixel_repo):
    latent, _ = latent_repo
    files = sorted(p.relative_to(latent).as_posix() for p in latent.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "model_index.json",
        "pipeline_diffit.py",
        "sample_grid.png",
        "scheduler/scheduler_config.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "transformer/transformer_diffit.py",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    index = json.loads((latent / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_diffit", "DiffiTPipeline"]
    assert index["transformer"] == ["transformer_diffit", "DiffiTTransformer2DModel"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["auto_map"] == {"AutoModel": "transformer_diffit.DiffiTTransformer2DModel"}
    config = json.loads((latent / "transformer" / "config.json").read_text())
    assert config["auto_map"] == index["auto_map"]

    pixel_index = json.loads((pixel_repo / "model_index.json").read_text())
    assert pixel_index["scheduler"] == ["scheduling_edm_heun", "EDMHeunScheduler"]
    assert pixel_index["auto_map"] == {"AutoModel": "unet_diffit.DiffiTUNet2DModel"}

    sources = {
        "pipeline_diffit.py": "diffusers_diffit.pipelines.pipeline_diffit",
        "transformer/transformer_diffit.py": "diffusers_diffit.models.transformer_diffit",
    }
    for folder, module_files in [
        (latent, sources),
        (
            pixel_repo,
            {
                "transformer/unet_diffit.py": "diffusers_diffit.models.unet_diffit",
                "scheduler/scheduling_edm_heun.py": "diffusers_diffit.schedulers.scheduling_edm_heun",
            },
        ),
    ]:
        for path, module in module_files.items():
            text = (folder / path).read_text()
            # one source of truth: what the package generates from its modules now
            assert text == generate_module_file(module), path
            assert text.startswith(f"# Generated by diffusers-diffit {diffusers_diffit.__version__} from {module} ")
            assert generated_from(text) == module
            # self-contained: diffusers would fetch no sibling file and import no diffusers_diffit module
            assert get_relative_imports(folder / path) == []
            assert "diffusers_diffit" not in {
                line.split()[1].split(".")[0]
                for line in text.splitlines()
                if line.lstrip().startswith(("import ", "from "))
            }
        assert stale_remote_code_files(folder) == []


def test_generated_files_name_their_packages_and_pass_diffusers_import_check(latent_repo, pixel_repo, monkeypatch):
    """The models import einops, which diffusers does not install: each file's header says what to pip install, and
    diffusers' own import check (run before it executes a repo file) finds everything in this environment."""
    needs = {
        "pipeline_diffit.py": "diffusers huggingface-hub numpy Pillow torch",
        "transformer/transformer_diffit.py": "diffusers einops torch",
        "transformer/unet_diffit.py": "diffusers einops torch",
        "scheduler/scheduling_edm_heun.py": "diffusers torch",
    }
    missing = []
    monkeypatch.setattr(dynamic_modules_utils.logger, "warning", lambda message, *args: missing.append(message))
    for folder in (latent_repo[0], pixel_repo):
        for path in sorted(folder.rglob("*.py")):
            name = path.relative_to(folder).as_posix()
            assert path.read_text().splitlines()[3] == f"# Needs: pip install {needs[name]}", name
            assert dynamic_modules_utils.check_imports(path) == []
    assert missing == []


def test_drift_is_detected(pixel_repo, tmp_path):
    folder = tmp_path / "copy"
    DiffiTPipeline.from_pretrained(pixel_repo).save_pretrained(folder, remote_code=True)
    assert stale_remote_code_files(folder) == []
    code = folder / "transformer" / "unet_diffit.py"
    code.write_text(code.read_text().replace("def group_norm(", "def group_norm_(", 1))
    header = folder / "pipeline_diffit.py"
    header.write_text(header.read_text().replace(diffusers_diffit.__version__, "0.0.1", 1))
    assert stale_remote_code_files(folder) == ["pipeline_diffit.py", "transformer/unet_diffit.py"]


def test_generated_code_may_import_only_diffusers_and_its_requirements():
    check_generated_imports("import os\nimport torch\nfrom diffusers.models import ModelMixin\n")
    for bad in (
        "import accelerate\n",
        "from diffusers_diffit.guidance import apply_guidance\n",
        "from .guidance import apply_guidance\n",
        "def f():\n    import timm\n",
        '"""Example:\n\n    from diffusers_diffit import DiffiTPipeline\n"""\n',
    ):
        with pytest.raises(ValueError, match="import"):
            check_generated_imports(bad)
    assert set(ALLOWED_IMPORTS) == {"torch", "diffusers", "numpy", "PIL", "einops", "safetensors", "huggingface_hub"}


def test_package_classes_win_with_or_without_trust_remote_code(latent_repo, pixel_repo):
    for folder, model_class in [(latent_repo[0], DiffiTTransformer2DModel), (pixel_repo, DiffiTUNet2DModel)]:
        for trust in (False, True):
            pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=trust)
            assert type(pipe) is DiffiTPipeline and type(pipe.transformer) is model_class
        # str: diffusers 0.42's AutoModel joins the path into its load id
        model = AutoModel.from_pretrained(str(folder), subfolder="transformer", trust_remote_code=True)
        assert type(model) is model_class
    assert type(DiffusionPipeline.from_pretrained(pixel_repo).scheduler) is EDMHeunScheduler


def test_diffusers_hub_download_accepts_repos_without_code(tmp_path):
    """diffusers' download step (online only: offline it reads the cache) refuses a model_index.json naming a module
    it cannot load and for which the repo has no file; with the package imported, its modules are loadable."""
    from diffusers.pipelines.pipeline_loading_utils import _get_custom_components_and_folders

    for folder in (Path(embedded_model_path("digits")), _saved_latent(tmp_path)):
        index = json.loads((folder / "model_index.json").read_text())
        files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        custom, folders = _get_custom_components_and_folders("someone/diffit", index, files)
        assert custom == {} and {"transformer", "scheduler"} <= set(folders)
    unknown = dict(index, transformer=["someone_elses_package.models", "Model"])
    with pytest.raises(ValueError, match="does not exist in someone/diffit"):  # the gate itself still works
        _get_custom_components_and_folders("someone/diffit", unknown, files)


def _saved_latent(tmp_path) -> Path:

    make_pipe().save_pretrained(tmp_path / "latent")
    return tmp_path / "latent"


def test_folders_without_code_load_through_diffusion_pipeline(tmp_path):
    digits = DiffusionPipeline.from_pretrained(embedded_model_path("digits"))
    assert type(digits) is DiffiTPipeline and type(digits.transformer) is DiffiTUNet2DModel
    digits.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "DiffiTPipeline" and "auto_map" not in index
    assert not list((tmp_path / "saved").rglob("*.py"))
    for trust in (False, True):
        again = DiffusionPipeline.from_pretrained(tmp_path / "saved", trust_remote_code=trust)
        assert type(again) is DiffiTPipeline and type(again.scheduler) is type(digits.scheduler)
    images = again([3], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 16, 16, 1)


def test_hand_written_code_still_needs_trust(tmp_path, pixel_repo):
    """The package only stands in for files it generated: any other repo code keeps diffusers' trust check."""
    folder = tmp_path / "custom"
    DiffiTPipeline.from_pretrained(pixel_repo).save_pretrained(folder, remote_code=True)
    code = folder / "pipeline_diffit.py"
    code.write_text("# my own pipeline\n" + code.read_text())
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(folder)


def test_remote_code_cannot_be_pushed_before_it_is_written(pixel_repo, tmp_path):
    pipe = DiffiTPipeline.from_pretrained(pixel_repo)
    with pytest.raises(ValueError, match="`push_to_hub=True` with `remote_code=True`"):
        pipe.save_pretrained(tmp_path / "x", remote_code=True, push_to_hub=True)
    assert not (tmp_path / "x").exists()


def test_model_card_and_upload(latent_repo):
    folder, calls = latent_repo
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "diffusers" and card.data.license == "cc-by-nc-sa-4.0"
    assert card.data.base_model == "nvidia/DiffiT" and card.data.pipeline_tag == "unconditional-image-generation"
    assert 'DiffusionPipeline.from_pretrained("someone/DiffiT-tiny", trust_remote_code=True' in card.text
    automodel = 'AutoModel.from_pretrained("someone/DiffiT-tiny", subfolder="transformer", trust_remote_code=True)'
    assert automodel in card.text
    assert 'DiffiTPipeline.from_pretrained("someone/DiffiT-tiny"' in card.text
    assert "![Samples of the converted pipeline](sample_grid.png)" in card.text
    assert "Classes 207 golden retriever, 0 tench; seed 0, 2 steps" in card.text
    from PIL import Image

    grid = Image.open(folder / "sample_grid.png")
    assert grid.size == (2 * 16 + 2, 16)  # two 16-px samples of the tiny VAE, 2-px gap
    assert calls[0] == ("HfApi", None) and calls[1] == ("create_repo", "someone/DiffiT-tiny", None, True)
    name, repo, message, uploaded = calls[2]
    assert (name, repo) == ("upload_folder", "someone/DiffiT-tiny")
    assert message == "DiffiT 256px converted to diffusers (fp32)"
    assert {"pipeline_diffit.py", "transformer/transformer_diffit.py", "sample_grid.png", "README.md"} <= set(uploaded)


def test_card_install_line_names_every_package_the_generated_code_imports(latent_repo):
    """Each module the generated files import from outside the standard library, found by parsing the files and
    asking importlib.metadata which distribution provides it, is on the card's one pip line; einops among them
    (diffusers does not install it)."""
    folder, _ = latent_repo
    providers = importlib.metadata.packages_distributions()
    canonical = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # PEP 503
    needed = set()
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module.split(".")[0]]
            else:
                continue
            needed |= {canonical(d) for m in modules if m not in sys.stdlib_module_names for d in providers[m]}
    assert {"einops", "torch", "diffusers"} <= needed
    text = ModelCard.load(folder / "README.md").text
    pip_lines = [line.split()[2:] for line in text.splitlines() if line.startswith("pip install ")]
    assert len(pip_lines) == 1 and needed <= {canonical(p) for p in pip_lines[0]}
    assert pip_lines[0] == remote_code_requirements(folder)


def test_card_text_is_written_as_given(tmp_path):
    text = "# DiffiT\n\n{{ not_a_variable }} {% if x %}\n\n```python\nlabels = {'a': [1, 2]}\n```\n"
    hub.create_model_card(tmp_path, text, license="mit", tags=["diffit"]).save(tmp_path / "README.md")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.text.strip() == text.strip()
    assert card.data.to_dict() == {"library_name": "diffusers", "license": "mit", "tags": ["diffit"]}


def test_card_without_remote_code_does_not_promise_plain_diffusers(conversion_inputs, tmp_path, capsys):
    checkpoint, vae, _ = conversion_inputs
    out = tmp_path / "no-code"
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
            "--no_remote_code",
            "--push_to_hub",
            "someone/x",
            "--dry_run",
        ]
    )
    card = ModelCard.load(out / "README.md")
    assert "trust_remote_code" not in card.text and "This repo holds no code" in card.text
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert not list(out.rglob("*.py")) and not (out / "sample_grid.png").exists()
    assert "Would upload to someone/x" in capsys.readouterr().out
    assert type(DiffusionPipeline.from_pretrained(out)) is DiffiTPipeline


def test_hub_repo_code_is_read_not_run_with_the_package(pixel_repo, monkeypatch):
    """For a Hub id, diffusers asks for the pipeline class before downloading the repo: the package fetches only the
    code file to read its header, and leaves anything it cannot fetch to diffusers' own checks."""
    import huggingface_hub
    from diffusers.pipelines import pipeline_loading_utils

    fetched = []

    def fake_download(repo_id, filename, subfolder=None, **kwargs):
        fetched.append((repo_id, filename, subfolder, kwargs))
        if repo_id != "someone/DiffiT-pixel":
            raise huggingface_hub.errors.LocalEntryNotFoundError(f"{repo_id}/{filename} is not cached (offline)")
        return str(pixel_repo / (subfolder or "") / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    load = pipeline_loading_utils.get_class_from_dynamic_module
    cls = load("someone/DiffiT-pixel", module_file="pipeline_diffit.py", class_name="DiffiTPipeline", revision="v1")
    assert cls is DiffiTPipeline
    assert fetched == [("someone/DiffiT-pixel", "pipeline_diffit.py", None, {"revision": "v1"})]
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        load("someone/other", module_file="pipeline_diffit.py", class_name="DiffiTPipeline")
