"""Convert one of NVIDIA's released DiffiT checkpoints into a complete diffusers pipeline folder with a model card, and
optionally upload it to the Hub.

    python conversion/convert_diffit_to_diffusers.py --checkpoint_path diffit_256.safetensors \\
        --output_path DiffiT-XL-2-256 [--vae stabilityai/sd-vae-ft-ema] [--image_size 256] [--dtype fp32] \\
        [--remote_code] [--sample_grid] [--push_to_hub you/DiffiT-XL-2-256 [--private]] [--dry_run]

The folder holds the transformer, the VAE, the official DDPM scheduler and a model_index.json with the ImageNet
id2label and the resolution's sampling recipe as defaults. After writing, the folder is reloaded and its transformer
checked against the checkpoint. `--dry_run` writes the folder but uploads nothing: it prints what would be uploaded.

`--remote_code` also writes the DiffiT code, generated from the installed diffusers-diffit, into the folder, so that
plain diffusers loads it with `trust_remote_code=True` (`DiffusionPipeline` and `AutoModel`). The default
(`--no_remote_code`) is a folder without code, for the diffusers-diffit package. `--sample_grid` renders a grid of
samples with the converted pipeline into `sample_grid.png` and shows it in the model card.
"""

import argparse
import logging
import sys
from pathlib import Path

import torch

from diffusers_diffit.cli import make_grid, parse_labels
from diffusers_diffit.guidance import GUIDANCE_SCHEDULES
from diffusers_diffit.hub import DIFFIT_CITATION, create_model_card, push_to_hub
from diffusers_diffit.pipelines import OFFICIAL_RECIPES, RECIPE_KEYS, DiffiTPipeline
from diffusers_diffit.remote_code import remote_code_requirements
from diffusers_diffit.utils import DTYPES, dtype_name


logger = logging.getLogger("convert_diffit_to_diffusers")

LICENSE = "cc-by-nc-sa-4.0"  # the weights' licence (share-alike): converted repos carry it
TAGS = ["diffit", "diffusion-transformer", "class-conditional", "imagenet", "image-generation"]
# The Hub has no class-conditional task; diffusers' own class-conditional DiT repos set none. Unconditional image
# generation is the Hub task whose widget takes no text, which fits sampling by class id.
PIPELINE_TAG = "unconditional-image-generation"
SAMPLE_GRID = "sample_grid.png"
SAMPLE_LABELS = ["88", "207", "279", "360", "387", "417", "974", "979"]  # macaw, golden retriever, arctic fox, ...
# NVIDIA's reported ImageNet FID-50K results with the official recipe (ADM evaluator), by image side.
REPORTED = {  # FID, sFID, IS, precision, recall
    256: ("1.73", "4.54", "276.49", "0.802", "0.621"),
    512: ("2.67", "4.99", "252.13", "0.828", "0.550"),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint_path", required=True, help="official checkpoint (.safetensors/.pt) or owner/repo/file"
    )
    parser.add_argument("--output_path", required=True, help="folder to write the pipeline to")
    parser.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="AutoencoderKL: Hub id or local folder")
    parser.add_argument(
        "--image_size",
        type=int,
        choices=sorted(OFFICIAL_RECIPES),
        default=None,
        help="resolution whose official recipe becomes the default (inferred from the checkpoint)",
    )
    parser.add_argument(
        "--dtype", type=dtype_name, choices=sorted(DTYPES), default="fp32", help="dtype of the saved weights"
    )
    parser.add_argument("--push_to_hub", metavar="REPO_ID", default=None, help="upload the folder to this model repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--dry_run", action="store_true", help="with --push_to_hub: list the upload, send nothing")
    code = parser.add_mutually_exclusive_group()
    code.add_argument(
        "--remote_code",
        dest="remote_code",
        action="store_true",
        help="also write the DiffiT code, so that plain diffusers loads the folder with trust_remote_code=True",
    )
    code.add_argument(
        "--no_remote_code",
        dest="remote_code",
        action="store_false",
        help="(default) no code in the folder: loading it needs the diffusers-diffit package",
    )
    parser.add_argument(
        "--sample_grid",
        action="store_true",
        help=f"render {SAMPLE_GRID} with the converted pipeline and show it in the model card",
    )
    parser.add_argument(
        "--sample_labels",
        nargs="+",
        default=SAMPLE_LABELS,
        metavar="LABEL",
        help="with --sample_grid: class ids or names, one column each (default: 8 ImageNet classes)",
    )
    parser.add_argument(
        "--sample_steps", type=int, default=None, help="with --sample_grid: sampling steps (default: the recipe's)"
    )
    args = parser.parse_args(argv)
    if (args.private or args.dry_run) and args.push_to_hub is None:
        parser.error("--private and --dry_run need --push_to_hub REPO_ID")
    if args.sample_steps is not None and args.sample_steps < 1:
        parser.error(f"--sample_steps must be >= 1, got {args.sample_steps}")
    return args


def usage_section(repo_id: str, code_requirements: list[str] | None) -> str:
    """How to load the pipeline: with diffusers-diffit installed, and with plain diffusers when the repo has code
    (`code_requirements`: the pip packages its code files import; None for a repo without code)."""
    package = f"""```python
import torch
from diffusers_diffit import DiffiTPipeline  # pip install diffusers-diffit

pipe = DiffiTPipeline.from_pretrained("{repo_id}", dtype=torch.float16).to("cuda")
image = pipe("golden retriever", generator=torch.manual_seed(0)).images[0]  # the official recipe below
images = pipe([207, "tiger cat"], num_images_per_label=4).images  # ImageNet ids or names (any synonym)
```"""
    if code_requirements is None:
        return f"""With the [diffusers-diffit](https://pypi.org/project/diffusers-diffit/) package installed:

{package}

This repo holds no code, so plain diffusers cannot load it without the package."""
    return f"""With plain diffusers: the DiffiT code is in this repo (generated from diffusers-diffit), so trust it. The
code imports these packages:

```bash
pip install {" ".join(code_requirements)}
```

```python
import torch
from diffusers import AutoModel, DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True, dtype=torch.float16).to("cuda")
image = pipe("golden retriever", generator=torch.manual_seed(0)).images[0]  # the official recipe below
transformer = AutoModel.from_pretrained("{repo_id}", subfolder="transformer", trust_remote_code=True)
```

With the [diffusers-diffit](https://pypi.org/project/diffusers-diffit/) package installed, its own classes are used
and `trust_remote_code` is not needed (the code in this repo is then not run):

{package}"""


def model_description(
    pipe: DiffiTPipeline,
    image_size: int,
    repo_id: str,
    vae: str,
    dtype: str,
    code_requirements: list[str] | None = None,
    sample_grid: str | None = None,
) -> str:
    """The card text: what this is, how to use it (`code_requirements`: as in `usage_section`), the recipe, NVIDIA's
    numbers, licence and citation."""
    cfg, recipe = pipe.transformer.config, OFFICIAL_RECIPES[image_size]
    schedule = GUIDANCE_SCHEDULES[recipe["guidance_schedule"]]
    values = [f"w = {recipe['guidance_scale']:g}"]
    if "guidance_power" in recipe:  # the recipes that read p name it
        values.append(f"p = {recipe['guidance_power']:g}")
    if schedule.needs_discrete_time:
        values.append(f"T = {pipe.scheduler.config.num_train_timesteps}")
    guidance = f"the {schedule.name} schedule {schedule.description} ({', '.join(values)})"
    params = sum(p.numel() for p in pipe.transformer.parameters())
    numbers = " | ".join(REPORTED[image_size])
    grid = "" if sample_grid is None else f"\n![Samples of the converted pipeline]({SAMPLE_GRID})\n\n{sample_grid}\n"
    return f"""# DiffiT {image_size}×{image_size} (class-conditional ImageNet) — diffusers format

NVIDIA's released latent DiffiT ([Hatamizadeh et al., ECCV 2024](https://arxiv.org/abs/2312.02139)), converted from
[`nvidia/DiffiT`](https://huggingface.co/nvidia/DiffiT) to a diffusers pipeline with the `diffusers-diffit` package:
`DiffiTTransformer2DModel` ({cfg.num_layers} blocks, width {cfg.num_attention_heads * cfg.attention_head_dim},
{params:,} parameters, {dtype}), the VAE `{vae}` and the official DDPM scheduler.
{grid}
## Usage

{usage_section(repo_id, code_requirements)}

Faster sampling with another scheduler (the learned variance is then dropped):

```python
from diffusers import DPMSolverMultistepScheduler

pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, variance_type=None)
image = pipe("golden retriever", num_inference_steps=25).images[0]
```

## Sampling recipe (the pipeline's defaults)

- Ancestral DDPM, 1000 linear betas 1e-4 → 0.02 respaced to {recipe["num_inference_steps"]} steps, learned-range
  variance, no clipping.
- Classifier-free guidance on the first {recipe["guided_channels"]} of the 4 latent channels, {guidance}.
- Latents decoded with `vae.decode(z / {pipe.vae.config.scaling_factor})`.

## Reported results (NVIDIA, ImageNet {image_size}, FID-50K with the recipe above)

| FID | sFID | IS | Precision | Recall |
|---|---|---|---|---|
| {numbers} |

These are the paper's numbers, not re-measured for this conversion.

## License

The weights are NVIDIA's, released under CC-BY-NC-SA-4.0 (non-commercial, share-alike); this converted copy carries
the same licence.

## Citation

```bibtex
{DIFFIT_CITATION}
```
"""


def check_written_pipeline(output_path: str, pipe: DiffiTPipeline) -> DiffiTPipeline:
    """Reload the folder; its transformer must equal the one read from the checkpoint, tensor for tensor and on a
    forward pass, and the defaults must have survived. Returns the reloaded pipeline."""
    reloaded = DiffiTPipeline.from_pretrained(output_path, dtype=pipe.transformer.dtype)
    expected, written = pipe.transformer.state_dict(), reloaded.transformer.state_dict()
    bad = sorted(k for k in expected if k not in written or not torch.equal(expected[k], written[k]))
    if bad or set(written) != set(expected):
        raise RuntimeError(
            f"The written transformer differs from the checkpoint: {bad or set(written) ^ set(expected)}"
        )
    cfg = pipe.transformer.config
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=generator).to(
        pipe.transformer.dtype
    )
    t, y = torch.tensor([999, 0]), torch.tensor([0, cfg.num_classes])
    if not torch.equal(
        pipe.transformer(x, t, y, return_dict=False)[0], reloaded.transformer(x, t, y, return_dict=False)[0]
    ):
        raise RuntimeError("The written transformer's output differs from the checkpoint's.")
    for key in ("id2label", *RECIPE_KEYS):
        if reloaded.config[key] != pipe.config[key]:
            raise RuntimeError(f"model_index.json lost {key}: {reloaded.config[key]!r} != {pipe.config[key]!r}")
    return reloaded


def render_sample_grid(pipe: DiffiTPipeline, path: Path, labels: list[str], steps: int | None, seed: int = 0) -> str:
    """Sample one image per label with the converted pipeline's defaults, save the row as a PNG at `path`; returns
    the caption for the model card."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = pipe.to(device)
    ids = [pipe.get_label_ids(label)[0] if isinstance(label, str) else label for label in parse_labels(labels)]
    images = pipe(ids, num_inference_steps=steps, generator=torch.Generator(device).manual_seed(seed)).images
    make_grid(images, columns=len(images), upscale=1).save(path)
    names = ", ".join(f"{i} {pipe.id2label[i][0]}" if i in pipe.id2label else str(i) for i in ids)
    steps = steps or pipe.config.num_inference_steps
    return f"Classes {names}; seed {seed}, {steps} steps with the recipe below."


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtype = DTYPES[args.dtype]

    pipe = DiffiTPipeline.from_single_file(
        args.checkpoint_path, vae=args.vae, image_size=args.image_size, torch_dtype=dtype
    )
    image_size = args.image_size or pipe.transformer.config.sample_size * pipe.vae_scale_factor
    pipe.save_pretrained(args.output_path, remote_code=args.remote_code)
    reloaded = check_written_pipeline(args.output_path, pipe)
    logger.info("Wrote and verified %s", args.output_path)
    caption = None
    if args.sample_grid:
        caption = render_sample_grid(
            reloaded, Path(args.output_path) / SAMPLE_GRID, args.sample_labels, args.sample_steps
        )
        logger.info("Wrote %s", Path(args.output_path) / SAMPLE_GRID)

    code_requirements = remote_code_requirements(args.output_path) if args.remote_code else None
    upload = args.push_to_hub is not None and not args.dry_run
    repo_id = args.push_to_hub or args.output_path
    card = create_model_card(
        args.push_to_hub if upload else args.output_path,  # a dry run reads no Hub card
        model_description(pipe, image_size, repo_id, args.vae, args.dtype, code_requirements, caption),
        license=LICENSE,
        base_model="nvidia/DiffiT",
        tags=TAGS,
        pipeline_tag=PIPELINE_TAG,
    )
    card.save(f"{args.output_path}/README.md")

    if args.push_to_hub is not None:
        plan = push_to_hub(
            args.output_path,
            args.push_to_hub,
            commit_message=f"DiffiT {image_size}px converted to diffusers ({args.dtype})",
            private=args.private or None,
            dry_run=args.dry_run,
        )
        verb = "Would upload" if args.dry_run else "Uploaded"
        print(f"{verb} to {plan.repo_id} with commit message {plan.commit_message!r}:")
        print("\n".join(f"  {name}" for name in plan.files))
        if plan.commit_url:
            print(plan.commit_url)


if __name__ == "__main__":
    sys.exit(main())
