#!/usr/bin/env python
"""Sample N images with uniformly random class labels for FID / IS / precision / recall, sharded across processes.

Writes `<output_dir>/images/<index>.png` (one file per sample, written atomically, so a re-run skips the finished
ones) and, at the end, `<output_dir>/samples.npz` in the format of ADM's evaluator (openai/guided-diffusion,
`evaluations/evaluator.py`): `arr_0` uint8 [N, H, W, 3] (grayscale replicated to 3 channels), plus `labels` [N].

Sample i uses class `labels[i]` (drawn once from --seed) and its own generator seeded from (--seed, i), so the set of
images does not depend on the number of processes or the batch size (up to floating-point noise of batching).

    accelerate launch --num_processes 8 examples/sample_fid.py --model nvidia-diffit-256 \\
        --num_samples 50000 --batch_size 64 --output_dir fid/diffit-256
    python evaluator.py VIRTUAL_imagenet256_labeled.npz fid/diffit-256/samples.npz

The pipeline's own sampling recipe is used unless a flag overrides it (for a converted 256-px pipeline: the
official 250-step DDPM sampler with the power-cosine guidance, docs/diffit-equations.md#sampling).
"""

import argparse
import logging
import os
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.logging import get_logger
from PIL import Image
from tqdm.auto import tqdm

from diffusers_diffit.guidance import GUIDANCE_SCHEDULES, describe_guidance_schedules
from diffusers_diffit.pipelines import RECIPE_KEYS, DiffiTPipeline
from diffusers_diffit.seeding import derive_seed
from diffusers_diffit.utils import DTYPES, dtype_name


logger = get_logger(__name__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="A DiffiT pipeline folder or Hub id.")
    p.add_argument("--num_samples", type=int, default=50_000)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--batch_size", type=int, default=32, help="Images per forward, per process.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype", type=dtype_name, choices=sorted(DTYPES), default="fp32", help="Weights and activations dtype."
    )
    # the sampling recipe (RECIPE_KEYS): each flag left out keeps the pipeline's saved value
    p.add_argument("--num_inference_steps", type=int)
    p.add_argument("--guidance_scale", type=float)
    p.add_argument("--guidance_schedule", choices=list(GUIDANCE_SCHEDULES), help=describe_guidance_schedules())
    p.add_argument("--guidance_power", type=float)
    p.add_argument("--guided_channels", type=int)
    p.add_argument(
        "--guidance_interval",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="Guide only at steps with LOW <= t <= HIGH (in the scheduler's timestep units).",
    )
    p.add_argument("--no_npz", action="store_true", help="Only write the PNG files.")
    args = p.parse_args(argv)
    for name in ("num_samples", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def sample_labels(num_samples: int, num_classes: int, seed: int) -> np.ndarray:
    """Uniform class ids in [0, num_classes) for every sample (int64 [N]); -1 for unconditional models."""
    if num_classes == 0:
        return np.full(num_samples, -1, dtype=np.int64)
    generator = torch.Generator().manual_seed(derive_seed(seed, 0))
    return torch.randint(0, num_classes, (num_samples,), generator=generator).numpy()


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    state = PartialState()
    images_dir = Path(args.output_dir) / "images"
    if state.is_main_process:
        images_dir.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()

    pipe = DiffiTPipeline.from_pretrained(args.model, dtype=DTYPES[args.dtype]).to(state.device)
    pipe.set_progress_bar_config(disable=True)
    num_classes = pipe.transformer.config.num_classes
    labels = sample_labels(args.num_samples, num_classes, args.seed)
    recipe = {k: getattr(args, k) for k in RECIPE_KEYS if getattr(args, k) is not None}

    def path_of(i: int) -> Path:
        return images_dir / f"{i:06d}.png"

    todo = [i for i in range(state.process_index, args.num_samples, state.num_processes) if not path_of(i).is_file()]
    batches = [todo[k : k + args.batch_size] for k in range(0, len(todo), args.batch_size)]
    logger.info(
        f"{args.num_samples} samples, {len(todo)} left on process {state.process_index}", main_process_only=False
    )
    for batch in tqdm(batches, desc="batches", disable=not state.is_local_main_process):
        generators = [torch.Generator(state.device).manual_seed(derive_seed(args.seed, 1, i)) for i in batch]
        images = pipe(
            class_labels=[int(labels[i]) for i in batch] if num_classes else None,
            num_images_per_label=1 if num_classes else len(batch),
            generator=generators,
            output_type="pil",  # uint8 = clamp((x + 1)·127.5) truncated, the official conversion
            **recipe,
        ).images
        for i, image in zip(batch, images):
            tmp = path_of(i).with_name(f".tmp-{path_of(i).name}")
            image.save(tmp, format="PNG")
            os.replace(tmp, path_of(i))
    state.wait_for_everyone()

    if state.is_main_process and not args.no_npz:
        first = np.asarray(Image.open(path_of(0)))
        arr = np.empty((args.num_samples, *first.shape[:2], 3), dtype=np.uint8)
        for i in tqdm(range(args.num_samples), desc="npz"):
            pixels = np.asarray(Image.open(path_of(i)))
            arr[i] = pixels[..., None] if pixels.ndim == 2 else pixels
        npz = Path(args.output_dir) / "samples.npz"
        tmp = npz.with_name(".tmp-samples.npz")
        with open(tmp, "wb") as f:
            np.savez(f, arr_0=arr, labels=labels)
        os.replace(tmp, npz)
        logger.info(f"Wrote {npz}: arr_0 {arr.shape} uint8, labels {labels.shape}")


if __name__ == "__main__":
    main()
