"""The `diffit` console script.

    diffit sample --labels 3 1 4 --num-images-per-label 8 --output grid.png

samples a PNG grid (one row per label) from a DiffiT pipeline: by default the digits model shipped inside the package,
so it works offline on a fresh machine; `--model` takes any local pipeline folder or Hub id.
"""

import argparse
import logging
import math
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
)
from PIL import Image

from .embedded import embedded_model_path
from .evaluation.evaluator import add_evaluate_parser, run_evaluate
from .schedulers import EDMHeunScheduler

logger = logging.getLogger("diffit")

# --scheduler name -> (class, family). EDM schedulers need an EDM-trained model (σ-parametrised, c_noise timesteps),
# discrete-time ones a model trained on DDPM timesteps 0…999.
SCHEDULERS = {
    "edm-heun": (EDMHeunScheduler, "edm"),
    "edm-euler": (EDMEulerScheduler, "edm"),
    "edm-dpmsolver": (EDMDPMSolverMultistepScheduler, "edm"),
    "ddpm": (DDPMScheduler, "discrete"),
    "ddim": (DDIMScheduler, "discrete"),
    "dpmsolver": (DPMSolverMultistepScheduler, "discrete"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffit", description="DiffiT (Diffusion Vision Transformers) for diffusers.")
    commands = parser.add_subparsers(dest="command", required=True)
    sample = commands.add_parser("sample", help="sample a PNG grid of images, one row per label")
    sample.add_argument("--model", default=None,
                        help="local pipeline folder or Hub id (default: the digits model shipped in the package)")
    sample.add_argument("--labels", nargs="+", default=None,
                        help="class ids or names (quote names with spaces); omit for unconditional samples")
    sample.add_argument("--num-images-per-label", type=int, default=8)
    sample.add_argument("--steps", type=int, default=None, help="scheduler steps (default: the pipeline's)")
    sample.add_argument("--guidance-scale", type=float, default=None, help="default: the pipeline's")
    sample.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None,
                        help="replace the pipeline's scheduler (same family: edm-* or discrete)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    sample.add_argument("--upscale", type=int, default=None,
                        help="nearest-neighbour zoom of each image (default: enough to make it at least 64 px)")
    sample.add_argument("--output", type=Path, default=Path("grid.png"))
    add_evaluate_parser(commands)
    return parser


def parse_labels(labels: list[str] | None) -> list[int | str] | None:
    """Command-line tokens -> class ids (tokens that are integers) and names."""
    if labels is None:
        return None
    return [int(label) if label.lstrip("-").isdigit() else label for label in labels]


def swap_scheduler(pipe, name: str):
    """`pipe.scheduler` replaced by the scheduler `name` built from its config, refusing a change of family."""
    cls, family = SCHEDULERS[name]
    current = "edm" if "sigma_data" in pipe.scheduler.config else "discrete"
    if family != current:
        raise ValueError(
            f"`--scheduler {name}` is a {family} scheduler but this model was trained for {current} ones; choose "
            f"from {sorted(n for n, (_, f) in SCHEDULERS.items() if f == current)}."
        )
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def make_grid(images: list[Image.Image], columns: int, upscale: int) -> Image.Image:
    """Images (all one size) -> one image, `columns` per row, each zoomed `upscale`× (nearest), 2-px gaps."""
    width, height = images[0].width * upscale, images[0].height * upscale
    rows, gap = math.ceil(len(images) / columns), 2
    grid = Image.new(images[0].mode, (columns * (width + gap) - gap, rows * (height + gap) - gap))
    for i, image in enumerate(images):
        tile = image.resize((width, height), Image.Resampling.NEAREST)
        grid.paste(tile, ((i % columns) * (width + gap), (i // columns) * (height + gap)))
    return grid


def sample(args: argparse.Namespace) -> Path:
    from . import DiffiTPipeline

    if args.num_images_per_label < 1:
        raise ValueError(f"`--num-images-per-label` must be >= 1, got {args.num_images_per_label}.")
    pipe = DiffiTPipeline.from_pretrained(args.model or embedded_model_path("digits")).to(args.device)
    if args.scheduler is not None:
        swap_scheduler(pipe, args.scheduler)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    images = pipe(
        parse_labels(args.labels),
        num_images_per_label=args.num_images_per_label,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        generator=generator,
    ).images
    upscale = args.upscale or max(1, math.ceil(64 / images[0].width))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, args.num_images_per_label, upscale).save(args.output)
    return args.output


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "sample":
        logger.info("wrote %s", sample(args))
    elif args.command == "evaluate":
        run_evaluate(args)


if __name__ == "__main__":
    main()
