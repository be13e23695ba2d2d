"""Write a Hugging Face Space that deploys as built, and optionally push it.

    python space_app/build_space.py --output space                       # the models shipped in the package
    python space_app/build_space.py --output space --model you/DiffiT-XL-2-256 --push_to_hub you/diffit [--private]
    python space_app/build_space.py --output space --push_to_hub you/diffit --dry_run   # list, upload nothing

By default the Space serves both models shipped in the package, "digits" and "digits-latent", picked on the page;
with `--model` it serves that one model alone. The folder holds `app.py`, `README.md` (the Space's YAML: pinned
`sdk_version` and `python_version`, the served models' licence, `models:` for a Hub model), `requirements.txt`
(pinned) and the source of `diffusers_diffit` itself, shipped models included, so `import diffusers_diffit` and the
shipped models work without a package index carrying them. A Space build installs
`requirements.txt` on its own first, from a copy outside the folder, so the package cannot be a requirement (a
relative path to a wheel would not resolve there); as source next to `app.py` it is importable from the working
directory. A local `--model` folder is copied into `model/`; a Hub `--model` is downloaded when the app starts.
"""

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

from diffusers_diffit.embedded import EMBEDDED_MODELS
from diffusers_diffit.guidance import GUIDANCE_SCHEDULES


HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYTHON_VERSION = "3.11"  # the Python the tests run the Space with
PACKAGE_LICENSE = "apache-2.0"  # diffusers-diffit's licence (setup.cfg), so also the shipped models'
IMAGENET_LICENSE = "cc-by-nc-sa-4.0"  # NVIDIA's DiffiT weights, and every repository converted from them
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".DS_Store")


def read_pins(path: Path = HERE / "requirements.txt") -> dict[str, str]:
    """`name==version` lines of a requirements file -> {name: version}; any other requirement is an error."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][\w.-]*)==([\w.+-]+)", line)
        if match is None:
            raise ValueError(f"{path}: every requirement must be pinned as name==version, got {line!r}.")
        pins[match[1].lower()] = match[2]
    return pins


def describe_model(model: str | None, license: str | None = None) -> dict:
    """What the Space serves: {"model" (for space_config.json; None: the models shipped in the package), "names" (the
    Model picker's entries), "license", "hub_id", "hardware", "local"}.

    No network: a Hub model's licence is `license` or, by default, NVIDIA's weights' (CC-BY-NC-SA-4.0)."""
    if model is None:
        return dict(
            model=None,
            names=list(EMBEDDED_MODELS),
            license=license or PACKAGE_LICENSE,
            hub_id=None,
            hardware="cpu-basic",
            local=None,
        )
    if os.path.isdir(model):
        folder = Path(model)
        if not (folder / "model_index.json").is_file():
            raise ValueError(f"`--model` {model} is a folder without model_index.json, not a diffusers pipeline.")
        transformer = json.loads((folder / "transformer" / "config.json").read_text(encoding="utf-8"))
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        num_classes = transformer.get("num_classes", 0)
        if license is None:
            license = _card_license(folder) or (IMAGENET_LICENSE if num_classes == 1000 else None)
        if license is None:
            raise ValueError(f"`--model` {model} has no model card with a licence: pass `--license`.")
        latent = index.get("vae", [None, None])[0] is not None
        return dict(
            model="model",
            names=["model"],
            license=license,
            hub_id=None,
            hardware="zero-a10g" if latent else "cpu-basic",
            local=folder,
        )
    if not HUB_ID.fullmatch(model):
        raise ValueError(f"`--model` must be a local pipeline folder or a Hub id (owner/name), got {model!r}.")
    return dict(
        model=model,
        names=[model],
        license=license or IMAGENET_LICENSE,
        hub_id=model,
        hardware="zero-a10g",
        local=None,
    )


def _card_license(folder: Path) -> str | None:
    card = folder / "README.md"
    if not card.is_file():
        return None
    from huggingface_hub import ModelCard

    return ModelCard.load(card).data.get("license")


def space_readme(served: dict, gradio_version: str, space_id: str | None) -> str:
    from huggingface_hub import SpaceCardData

    model_name = served["hub_id"] or (
        f"{' and '.join(served['names'])}, shipped with diffusers-diffit: pick one with the page's Model picker"
        if served["model"] is None
        else "the pipeline in `model/`"
    )
    data = SpaceCardData(
        title="DiffiT",
        emoji="🌀",
        colorFrom="indigo",
        colorTo="green",
        sdk="gradio",
        sdk_version=gradio_version,
        python_version=PYTHON_VERSION,
        app_file="app.py",
        pinned=False,
        license=served["license"],
        models=[served["hub_id"]] if served["hub_id"] else None,
        short_description="Class-conditional images from DiffiT (ECCV 2024)",
        suggested_hardware=served["hardware"],
        tags=["diffusers", "diffit", "image-generation"],
    )
    client_target = space_id or "http://127.0.0.1:7860/"
    classes = '["3", "7"]' if served["model"] is None else '["golden retriever", "volcano"]'
    schedules = " or ".join(f'"{name}"' for name in GUIDANCE_SCHEDULES)
    names = ", ".join(f'"{name}"' for name in served["names"])
    return f"""---
{data.to_yaml()}
---

# DiffiT: Diffusion Vision Transformers

Class-conditional image generation with [DiffiT](https://arxiv.org/abs/2312.02139) (Hatamizadeh, Song, Liu, Kautz,
Vahdat; ECCV 2024) through the `diffusers-diffit` package, whose source is in `diffusers_diffit/` here.

- **Model:** {model_name}. **Licence:** {served["license"]} (the served models'; NVIDIA's DiffiT weights are
  CC-BY-NC-SA-4.0, the package is Apache-2.0).
- Pick a model, classes (type to search), images per class, steps, guidance, scheduler and seed; picking a model
  sets the class and scheduler choices and the sampling settings to its own. The images come back as lossless PNGs
  at the model's resolution, one per class name, plus a grid.
- Another model, served alone: set the Space variable `DIFFIT_MODEL` to a converted DiffiT pipeline (Hub id), or
  rebuild with `python space_app/build_space.py --output DIR --model ID_OR_FOLDER`. ImageNet models want a GPU: on
  ZeroGPU hardware `spaces.GPU` is applied to the sampling function. On a CPU the app uses one thread
  (`DIFFIT_CPU_THREADS` to change).

## API

The `generate` endpoint takes the page's inputs and the model. Left out, the model is the first one, the sampling
settings (`steps`, `guidance_scale`, `guidance_schedule`, `scheduler`) are the picked model's saved recipe, and the
classes, images per class and seed are the values the page starts with. One request samples at a time and a bounded
number wait (the page says how many); when the queue is full, a call fails at once with "Queue is full! Please try again.": retry a little later.

```python
from gradio_client import Client

client = Client("{client_target}")
gallery, grid, seed = client.predict(
    classes={classes},       # names as the Classes picker lists them; [] = unconditional
    images_per_class=4,
    seed=0,
    randomize_seed=False,
    model="{served["names"][-1]}",  # an entry of the Model picker: {names}; left out, the first
    api_name="/generate",
)
print(gallery[0]["image"], gallery[0]["caption"], seed)   # local paths of the PNGs, class names, the seed used
```

Other arguments: `steps`, `guidance_scale`, `guidance_schedule` ({schedules}: the page lists those the model's
scheduler can drive), `scheduler` ("default" = the model's own, or a preset name the page lists). Mistakes come back
as an error that says what to change.

## Run it locally

```bash
pip install -r requirements.txt
python app.py            # http://127.0.0.1:7860
```
"""


def build_space(
    output: str | os.PathLike, model: str | None = None, license: str | None = None, space_id: str | None = None
) -> Path:
    """Write the Space folder `output` (emptied first if it exists) and return it."""
    served = describe_model(model, license)
    pins = read_pins()
    output = Path(output)
    if output.exists():
        if not output.is_dir():
            raise ValueError(f"`--output` {output} exists and is not a folder.")
        if any(output.iterdir()) and not (output / "app.py").is_file():
            raise ValueError(f"`--output` {output} is a non-empty folder that is not a Space built here; not erasing.")
        shutil.rmtree(output)
    output.mkdir(parents=True)

    shutil.copy2(HERE / "app.py", output / "app.py")
    shutil.copy2(HERE / "requirements.txt", output / "requirements.txt")
    shutil.copytree(ROOT / "diffusers_diffit", output / "diffusers_diffit", ignore=IGNORED)
    shutil.copytree(ROOT / "pipelines", output / "diffusers_diffit" / "pipelines", ignore=IGNORED)  # as in setup.cfg
    if served["local"] is not None:
        shutil.copytree(served["local"], output / "model", ignore=IGNORED)
    config = {"model": served["model"], "license": served["license"]}
    (output / "space_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (output / "README.md").write_text(space_readme(served, pins["gradio"], space_id), encoding="utf-8")
    return output


def space_files(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def push(folder: Path, repo_id: str, private: bool, dry_run: bool, commit_message: str) -> str | None:
    """Create the Space repo (gradio SDK) and upload the folder; with `dry_run`, only print what would be sent."""
    files = space_files(folder)
    print(f"Space {repo_id} ({'private' if private else 'public'}): {len(files)} files, commit {commit_message!r}")
    for name in files:
        print(f"  {name}")
    if dry_run:
        print("--dry_run: nothing uploaded.")
        return None
    from huggingface_hub import create_repo, upload_folder

    url = create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    upload_folder(repo_id=repo_id, repo_type="space", folder_path=folder, commit_message=commit_message)
    print(f"Pushed to {url}")
    return str(url)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="the Space folder to write (replaced if built here before)")
    parser.add_argument(
        "--model",
        default=None,
        help="Hub id or local pipeline folder to serve alone (default: the models shipped in the package)",
    )
    parser.add_argument(
        "--license",
        default=None,
        help="the served model's licence (default: its card's; cc-by-nc-sa-4.0 for a Hub model, "
        "apache-2.0 for the shipped models)",
    )
    parser.add_argument("--push_to_hub", metavar="USER/SPACE", default=None, help="create/update this Space")
    parser.add_argument("--private", action="store_true", help="create the Space private")
    parser.add_argument("--dry_run", action="store_true", help="with --push_to_hub: list the files, upload nothing")
    parser.add_argument("--commit_message", default="DiffiT Space built by space_app/build_space.py")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if (args.private or args.dry_run) and not args.push_to_hub:
        raise SystemExit("--private and --dry_run go with --push_to_hub.")
    if args.push_to_hub and not HUB_ID.fullmatch(args.push_to_hub):
        raise SystemExit(f"--push_to_hub must be USER/SPACE, got {args.push_to_hub!r}.")
    try:
        folder = build_space(args.output, args.model, args.license, args.push_to_hub)
    except ValueError as error:
        raise SystemExit(str(error))
    print(f"Wrote the Space to {folder}/ ({len(space_files(folder))} files). Try it: cd {folder} && python app.py")
    if args.push_to_hub:
        push(folder, args.push_to_hub, args.private, args.dry_run, args.commit_message)


if __name__ == "__main__":
    sys.exit(main())
