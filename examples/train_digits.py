"""Train the class-conditional digits DiffiT that ships inside the package (`embedded_model_path("digits")`).

    python examples/train_digits.py --output_dir outputs/digits                      # the shipped model
    python examples/train_digits.py --output_dir outputs/digits-unet --architecture unet   # benchmark baseline

One command, seeded, on the CPU by default; the defaults are the recipe of the shipped model.

- Data: scikit-learn's bundled digits (1797 8×8 images, ink 0…16, 10 classes). 50 random images per class are
  held out for `benchmarks/quality_digits.py` (`digits_split`); the model trains on the other 1297. Pixel =
  ink / 16 mapped to [-1, 1] (bright digits on a dark background), bilinearly upsampled to 16×16: the source
  holds 8×8 worth of information, 16×16 keeps three U-Net levels (16, 8, 4) with windowed attention at 16 and 8
  and global attention at 4, and one training step costs a quarter of one at 32×32 on a CPU.
- Model: `DiffiTUNet2DModel` with widths (32, 64, 64), one DiffiT ResBlock per level and side, window 4, head
  dim 16 (758,453 parameters); `--architecture unet` builds diffusers' `UNet2DModel` of about the same size
  (729,569: ResNet blocks, attention at 8×8 and 4×4). The "DiffiT architecture" flags train variants of the
  DiffiT model (the README's digits-quality table lists the ones measured).
- Recipe: EDM (`diffusers_diffit.edm.edm_loss`: σ_data 0.5, ln σ ~ N(−1.2, 1.2²), EDM weighting), Adam with a
  linear warm-up, labels replaced by the null class with probability 0.1 (for classifier-free guidance; done here
  for both architectures, so the DiffiT model's own `class_dropout_prob` is 0), EMA of the weights (diffusers'
  `EMAModel` with warm-up).
- Output: `<output_dir>/ema` (the EMA model, what gets shipped) and `<output_dir>/model` (the raw weights), both
  `save_pretrained` folders, and `<output_dir>/pipeline`, a `DiffiTPipeline` folder with `EDMHeunScheduler`
  (18 steps, guidance 1.25): the folder shipped as `diffusers_diffit/embedded/digits`. `--package_from DIR`
  writes such a folder from a saved model without training.

Results are reproducible for a given `--seed`, `--num_threads` and `--device` (the thread count and the device change
the float summation order; the random draws come from one CPU generator whatever the device). With `--device cuda`,
eight trainings sharing one H100 (one process each) took 3.8 min apiece.
Measured wall time of the default command (1 thread) on the shared 2-core machine, with the other architecture
training at the same time: 35 min for DiffiT, 31 min for the U-Net.
"""

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from sklearn.datasets import load_digits
from tqdm.auto import tqdm

from diffusers_diffit import DiffiTUNet2DModel, EDMHeunScheduler
from diffusers_diffit.edm import edm_loss


logger = logging.getLogger("train_digits")

NUM_CLASSES = 10
HELD_OUT_PER_CLASS = 50
ID2LABEL = {i: str(i) for i in range(NUM_CLASSES)}

DIGITS_DIFFIT = dict(
    sample_size=16,
    in_channels=1,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    window_size=4,
    attention_head_dim=16,
    time_embedding_dim=128,
    frequency_embedding_size=64,
    num_classes=NUM_CLASSES,
    class_dropout_prob=0.0,
)
DIFFIT_OPTIONS = ("block_out_channels", "layers_per_block", "window_size", "mlp_ratio", "time_embedding_dim")
# diffusers' UNet2DModel of about the same size: ResNet blocks, attention at 8 and 4, class table with a null row.
DIGITS_UNET = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 48, 48),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=16,
    norm_num_groups=8,
    num_class_embeds=NUM_CLASSES + 1,
)


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train ink [1297, 8, 8], train labels, held-out ink [500, 8, 8], held-out labels), ink in [0, 1]: 50 images
    per class, drawn at random with `seed`, are held out."""
    digits = load_digits()
    ink, labels = digits.images.astype(np.float32) / 16.0, digits.target
    rng, held_out = np.random.default_rng(seed), np.zeros(len(labels), dtype=bool)
    for c in range(NUM_CLASSES):
        held_out[rng.choice(np.flatnonzero(labels == c), HELD_OUT_PER_CLASS, replace=False)] = True
    return ink[~held_out], labels[~held_out], ink[held_out], labels[held_out]


def _upsampling_matrix(size: int) -> torch.Tensor:
    """The bilinear 8×8 -> size×size upsampling as a matrix [size², 64]."""
    basis = torch.eye(64).view(64, 1, 8, 8)
    return F.interpolate(basis, size=(size, size), mode="bilinear", align_corners=False).view(64, -1).T


def ink_to_model(ink: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """Ink [N, 8, 8] in [0, 1] -> model images [N, 1, size, size] in [-1, 1] (bilinear upsampling)."""
    x = torch.as_tensor(ink, dtype=torch.float32).reshape(-1, 64) @ _upsampling_matrix(size).T
    return (x * 2 - 1).view(-1, 1, size, size)


def model_to_ink(images: torch.Tensor) -> np.ndarray:
    """Model images [N, 1, s, s] in [-1, 1] -> ink [N, 8, 8] in [0, 1]: the least-squares inverse of the upsampling
    (exact on upsampled real digits; the singular values of the bilinear map lie in [0.56, 2]), clipped."""
    size = images.shape[-1]
    x = (images.detach().float().cpu().reshape(len(images), -1) + 1) / 2
    ink = x @ torch.linalg.pinv(_upsampling_matrix(size)).T
    return ink.clamp(0, 1).view(-1, 8, 8).numpy()


def build_model(architecture: str, **diffit_overrides) -> torch.nn.Module:
    """The shipped DiffiT (`DIGITS_DIFFIT`, entries replaced by `diffit_overrides`) or the U-Net baseline."""
    if architecture == "diffit":
        return DiffiTUNet2DModel(**{**DIGITS_DIFFIT, **diffit_overrides})
    if architecture == "unet":
        if diffit_overrides:
            raise ValueError(f"DiffiT options {sorted(diffit_overrides)} do not apply to `architecture` 'unet'.")
        return UNet2DModel(**DIGITS_UNET)
    raise ValueError(f"`architecture` must be 'diffit' or 'unet', got {architecture!r}.")


def save_pipeline(model: DiffiTUNet2DModel, path: Path, num_inference_steps: int, guidance_scale: float):
    """The shipped folder: model_index.json, transformer/ (safetensors), scheduler/."""
    from diffusers_diffit import DiffiTPipeline

    pipe = DiffiTPipeline(
        transformer=model,
        scheduler=EDMHeunScheduler(),
        vae=None,
        id2label=ID2LABEL,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
    )
    pipe.save_pretrained(path, safe_serialization=True)


def diffit_overrides(args: argparse.Namespace) -> dict:
    """The "DiffiT architecture" flags that were given, as `DIGITS_DIFFIT` entries."""
    return {name: getattr(args, name) for name in DIFFIT_OPTIONS if getattr(args, name) is not None}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/digits"))
    parser.add_argument("--architecture", choices=["diffit", "unet"], default="diffit")
    architecture = parser.add_argument_group(
        "DiffiT architecture", "override entries of DIGITS_DIFFIT, the shipped model's config (default: unchanged)"
    )
    architecture.add_argument("--block_out_channels", type=int, nargs="+", default=None)
    architecture.add_argument("--layers_per_block", type=int, default=None)
    architecture.add_argument("--window_size", type=int, default=None)
    architecture.add_argument("--mlp_ratio", type=float, default=None)
    architecture.add_argument("--time_embedding_dim", type=int, default=None)
    parser.add_argument("--max_train_steps", type=int, default=3000)
    parser.add_argument("--train_batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--lr_warmup_steps", type=int, default=200)
    parser.add_argument("--label_dropout", type=float, default=0.1, help="probability of training a null label")
    parser.add_argument("--ema_max_decay", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads (2 is faster on 2 cores)")
    parser.add_argument("--device", default="cpu",
                        help="where the model trains, e.g. cuda; random draws stay on the CPU generator")
    parser.add_argument("--num_inference_steps", type=int, default=18, help="saved as the pipeline default")
    parser.add_argument("--guidance_scale", type=float, default=1.25, help="saved as the pipeline default")
    parser.add_argument("--package_from", type=Path, default=None,
                        help="skip training: write the DiffiT model saved in this folder as a pipeline to --output_dir")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.package_from is not None:
        model = DiffiTUNet2DModel.from_pretrained(args.package_from)
        save_pipeline(model, args.output_dir, args.num_inference_steps, args.guidance_scale)
        logger.info("packaged %s as a pipeline in %s", args.package_from, args.output_dir)
        return
    torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    train_ink, train_labels, _, _ = digits_split()
    images = ink_to_model(train_ink, DIGITS_DIFFIT["sample_size"]).to(args.device)  # [1297, 1, 16, 16]
    labels = torch.as_tensor(train_labels, dtype=torch.long, device=args.device)
    model = build_model(args.architecture, **diffit_overrides(args)).to(args.device).train()
    logger.info("%s: %d parameters, %d training images", args.architecture, model.num_parameters(), len(images))

    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / args.lr_warmup_steps))
    ema = EMAModel(model.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, power=3 / 4)

    order, cursor = torch.randperm(len(images), generator=generator), 0
    start = time.time()
    progress = tqdm(range(args.max_train_steps), desc="train", mininterval=10)
    for step in progress:
        if cursor + args.train_batch_size > len(images):
            order, cursor = torch.randperm(len(images), generator=generator), 0
        batch = order[cursor : cursor + args.train_batch_size].to(args.device)
        cursor += args.train_batch_size
        y = labels[batch]
        dropped = (torch.rand(y.shape, generator=generator) < args.label_dropout).to(args.device)
        y = torch.where(dropped, NUM_CLASSES, y)

        loss = edm_loss(model, images[batch], y, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        ema.step(model.parameters())
        progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if (step + 1) % 250 == 0:
            logger.info("step %d loss %.4f (%.0f s)", step + 1, loss.item(), time.time() - start)
    logger.info("trained %d steps in %.1f min", args.max_train_steps, (time.time() - start) / 60)

    args.output_dir.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(args.output_dir / "model")
    ema.copy_to(model.parameters())
    model.save_pretrained(args.output_dir / "ema")
    if args.architecture == "diffit":
        save_pipeline(model, args.output_dir / "pipeline", args.num_inference_steps, args.guidance_scale)
    logger.info("saved to %s", args.output_dir)


if __name__ == "__main__":
    main()
