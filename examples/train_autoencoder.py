#!/usr/bin/env python
"""Train a small `diffusers.AutoencoderKL` with 🤗 accelerate, for latent DiffiT on data the SD-VAE was not made for.

The loss is the reconstruction error plus `--kl_weight` · KL(posterior ‖ N(0, I)), the VAE objective without SD's
perceptual and adversarial terms. After training, the latent scale is measured on the encoded training set the way
SD's 0.18215 was: one posterior sample per image, `shift_factor` = their mean and `scaling_factor` = 1 / their std
around it, so that `(z − shift_factor) · scaling_factor` has zero mean and unit variance, as the diffusion model
expects. Both are saved in the VAE's config, where `DiffiTPipeline` and `train_diffit.py` read them. The held-out
PSNR (posterior mean, images in [-1, 1] mapped to [0, 1]) goes into the log and the folder's README.

    # the built-in digits (1297 training images; the benchmark's 500 held-out digits give the PSNR)
    accelerate launch examples/train_autoencoder.py --digits --resolution 32 --output_dir outputs/digits-vae
    # any image folder (sub-folders are ignored as labels); 5 % of the images are held out for the PSNR
    accelerate launch examples/train_autoencoder.py --train_data_dir /data/faces --resolution 64 \\
        --channels 3 --block_out_channels 64 128 128 256 --output_dir outputs/faces-vae

The spatial factor is 2^(len(block_out_channels) − 1): 4 for the default three levels.
"""

import argparse
import logging
import math
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from tqdm.auto import tqdm

from diffusers_diffit.data import ImageDataset
from diffusers_diffit.seeding import derive_seed


logger = get_logger(__name__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, fromfile_prefix_chars="@"
    )  # `@file`: more flags, one per line (examples/digits_vae.args)
    data = p.add_argument_group("data")
    data.add_argument("--train_data_dir", help="A folder of images (searched recursively).")
    data.add_argument("--digits", action="store_true", help="The built-in digits (needs scikit-learn).")
    data.add_argument(
        "--validation_data_dir", help="Held-out images for the PSNR; default: a part of the training set."
    )
    data.add_argument(
        "--validation_fraction",
        type=float,
        default=0.05,
        help="Held out of --train_data_dir without a validation dir.",
    )
    data.add_argument("--resolution", type=int, required=True, help="Image side (centre crops).")
    data.add_argument("--channels", type=int, choices=[1, 3], default=3, help="1: grayscale (--digits: always 1).")
    model = p.add_argument_group("model")
    model.add_argument("--block_out_channels", type=int, nargs="+", default=[16, 32, 32])
    model.add_argument("--layers_per_block", type=int, default=1)
    model.add_argument("--latent_channels", type=int, default=4)
    model.add_argument("--norm_num_groups", type=int, default=16)
    model.add_argument("--kl_weight", type=float, default=1e-6)
    model.add_argument("--no_shift", action="store_true", help="Measure the scale only (shift_factor stays None).")
    train = p.add_argument_group("training")
    train.add_argument("--output_dir", required=True)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--train_batch_size", type=int, default=64)
    train.add_argument("--max_train_steps", type=int, default=2000)
    train.add_argument("--learning_rate", type=float, default=1e-3)
    train.add_argument("--lr_warmup_steps", type=int, default=100)
    train.add_argument("--lr_scheduler", default="cosine")
    train.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"])
    args = p.parse_args(argv)
    if args.digits == (args.train_data_dir is not None):
        p.error("pass exactly one of --train_data_dir / --digits")
    if args.digits and args.validation_data_dir:
        p.error("--digits holds out its own validation digits; --validation_data_dir is for --train_data_dir")
    for name in ("resolution", "train_batch_size", "max_train_steps", "latent_channels", "layers_per_block"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.kl_weight < 0 or args.learning_rate <= 0:
        p.error(f"--kl_weight must be >= 0 and --learning_rate > 0, got {args.kl_weight} and {args.learning_rate}")
    if not 0 < args.validation_fraction < 1:
        p.error(f"--validation_fraction must be in (0, 1), got {args.validation_fraction}")
    factor = 2 ** (len(args.block_out_channels) - 1)
    if args.resolution % factor:
        p.error(f"--resolution {args.resolution} must be divisible by the VAE's factor {factor}")
    bad = [c for c in args.block_out_channels if c % args.norm_num_groups]
    if bad:
        p.error(f"--block_out_channels {bad} are not divisible by --norm_num_groups {args.norm_num_groups}")
    if args.digits:
        args.channels = 1
    return args


class _Pixels(Dataset):
    """Items {"pixel_values": [C, R, R]} of an `ImageDataset` or a tensor (labels are not used)."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        item = self.data[index]
        return {"pixel_values": item[0] if isinstance(item, (tuple, list)) else item["pixel_values"]}


def build_datasets(args) -> tuple[Dataset, Dataset]:
    """(training, held-out) datasets of images in [-1, 1]."""
    if args.digits:
        from diffusers_diffit.data.digits import digits_split, ink_to_model

        train_ink, _, held_out_ink, _ = digits_split()
        return (
            _Pixels(TensorDataset(ink_to_model(train_ink, args.resolution))),
            _Pixels(TensorDataset(ink_to_model(held_out_ink, args.resolution))),
        )
    kwargs = dict(resolution=args.resolution, channels=args.channels, center_crop=True)
    train = ImageDataset.from_folder(args.train_data_dir, **kwargs)
    if args.validation_data_dir:
        return _Pixels(train), _Pixels(ImageDataset.from_folder(args.validation_data_dir, **kwargs))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
    held = max(1, round(args.validation_fraction * len(train)))
    if held >= len(train):
        raise ValueError(f"`--train_data_dir` has {len(train)} image(s): too few to hold some out for the PSNR.")
    return _Pixels(Subset(train, order[held:])), _Pixels(Subset(train, order[:held]))


def build_vae(args) -> AutoencoderKL:
    levels = len(args.block_out_channels)
    return AutoencoderKL(
        in_channels=args.channels,
        out_channels=args.channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(args.block_out_channels),
        layers_per_block=args.layers_per_block,
        latent_channels=args.latent_channels,
        norm_num_groups=args.norm_num_groups,
        sample_size=args.resolution,
    )


def vae_loss(vae, pixels: torch.Tensor, kl_weight: float, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Mean squared reconstruction error of a posterior sample + kl_weight · KL per latent element."""
    posterior = vae.encode(pixels).latent_dist
    reconstruction = vae.decode(posterior.sample(generator)).sample
    mse = ((reconstruction.float() - pixels) ** 2).mean()
    kl = posterior.kl().mean() / math.prod(posterior.mean.shape[1:])
    return mse + kl_weight * kl, {"mse": mse.item(), "kl": kl.item()}


@torch.no_grad()
def latent_statistics(vae, loader, device, seed: int) -> tuple[float, float]:
    """(mean, std) over every element of one posterior sample per image of `loader`."""
    generator = torch.Generator(device).manual_seed(seed)
    total, total_sq, count = 0.0, 0.0, 0
    for batch in loader:
        z = vae.encode(batch["pixel_values"].to(device)).latent_dist.sample(generator).double()
        total, total_sq, count = total + z.sum().item(), total_sq + (z**2).sum().item(), count + z.numel()
    mean = total / count
    return mean, math.sqrt(total_sq / count - mean**2)


@torch.no_grad()
def held_out_psnr(vae, loader, device) -> float:
    """PSNR in dB of the posterior-mean reconstructions, images mapped to [0, 1], over the whole held-out set."""
    squared, count = 0.0, 0
    for batch in loader:
        pixels = batch["pixel_values"].to(device)
        reconstruction = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
        squared += (((reconstruction - pixels) / 2) ** 2).sum().item()
        count += pixels.numel()
    return -10 * math.log10(squared / count)


def card_text(args, vae, psnr: float, num_train: int, num_held_out: int) -> str:
    source = "the built-in digits" if args.digits else f"`{args.train_data_dir}`"
    shift = vae.config.shift_factor
    return f"""---
library_name: diffusers
tags: [autoencoder-kl, diffusers-diffit]
---
# AutoencoderKL for latent DiffiT

Trained by `examples/train_autoencoder.py` of diffusers-diffit on {source} ({num_train} images at
{args.resolution} px, {args.channels} channel(s)): {args.max_train_steps} steps of batch {args.train_batch_size},
MSE + {args.kl_weight} · KL, seed {args.seed}.

- spatial factor {2 ** (len(args.block_out_channels) - 1)}, {args.latent_channels} latent channels,
  {vae.num_parameters():,} parameters
- measured on the encoded training set: `scaling_factor` = {vae.config.scaling_factor:.6g},
  `shift_factor` = {"None" if shift is None else f"{shift:.6g}"} (latents = (z − shift) · scale)
- held-out PSNR: {psnr:.2f} dB over {num_held_out} images
"""


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    set_seed(args.seed)
    train_set, held_out = build_datasets(args)
    vae = build_vae(args)
    logger.info(f"AutoencoderKL: {vae.num_parameters():,} parameters; {len(train_set)} training images")
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.learning_rate, weight_decay=0.0)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    loader = DataLoader(train_set, batch_size=args.train_batch_size, shuffle=True, drop_last=True)
    if len(loader) == 0:
        raise ValueError(f"The training set ({len(train_set)} images) is smaller than one batch.")
    vae, optimizer, loader, lr_scheduler = accelerator.prepare(vae, optimizer, loader, lr_scheduler)

    step, epoch = 0, 0
    progress = tqdm(total=args.max_train_steps, desc="steps", disable=not accelerator.is_local_main_process)
    vae.train()
    while step < args.max_train_steps:
        loader.set_epoch(epoch)  # accelerate's loader: the shuffle of this epoch
        for batch in loader:
            seed = derive_seed(args.seed, step, 0, accelerator.process_index)
            generator = torch.Generator(accelerator.device).manual_seed(seed)
            with accelerator.autocast():
                loss, logs = vae_loss(accelerator.unwrap_model(vae), batch["pixel_values"], args.kl_weight, generator)
            accelerator.backward(loss)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            step += 1
            progress.update(1)
            progress.set_postfix(mse=f"{logs['mse']:.2e}", kl=f"{logs['kl']:.2f}")
            if step >= args.max_train_steps:
                break
        epoch += 1
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        vae = accelerator.unwrap_model(vae).eval().float()
        measure = DataLoader(train_set, batch_size=256)
        mean, std = latent_statistics(vae, measure, accelerator.device, args.seed)
        shift = None if args.no_shift else mean
        scale = 1.0 / (std if shift is not None else math.sqrt(std**2 + mean**2))
        vae.register_to_config(scaling_factor=scale, shift_factor=shift)
        psnr = held_out_psnr(vae, DataLoader(held_out, batch_size=256), accelerator.device)
        output_dir = Path(args.output_dir)
        vae.save_pretrained(output_dir)
        (output_dir / "README.md").write_text(card_text(args, vae, psnr, len(train_set), len(held_out)))
        logger.info(
            f"Latents: mean {mean:.4f}, std {std:.4f} -> scaling_factor {scale:.6g}, shift_factor {shift}; "
            f"held-out PSNR {psnr:.2f} dB ({len(held_out)} images). Saved to {output_dir}"
        )
    accelerator.end_training()


if __name__ == "__main__":
    main()
