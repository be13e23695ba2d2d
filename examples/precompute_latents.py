#!/usr/bin/env python
"""Encode an image dataset once with the VAE, so `train_diffit.py --latents_dir` trains without running the encoder.

Stores the VAE posterior's moments (mean ‖ logvar, [2·C, h, w] per image, not a single sample) so training still
draws a fresh latent every step, exactly as it would from images, and optionally the moments of the horizontally
flipped image for `--random_flip`. Images are resized and centre-cropped (random crops cannot be cached).

    accelerate launch examples/precompute_latents.py --vae stabilityai/sd-vae-ft-ema \\
        --train_data_dir /data/imagenet/train --resolution 256 --flip --output_dir /data/imagenet-256-latents

Shards (`shard-00000.safetensors`, ...) are split across processes and written atomically; re-running the same
command skips finished shards. `metadata.json` is written last.
"""

import argparse
import json
import logging
import math
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from diffusers_diffit.data import ON_BAD_IMAGE, ImageDataset, load_vae, vae_fingerprint
from diffusers_diffit.utils import DTYPES, dtype_name, vae_scale_factor


logger = get_logger(__name__)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", required=True, help="AutoencoderKL folder / Hub id, or a pipeline with a `vae`.")
    parser.add_argument("--train_data_dir", help="ImageFolder: one sub-folder per class (sorted names -> ids).")
    parser.add_argument("--dataset_name", help="A 🤗 datasets name (needs `pip install datasets`).")
    parser.add_argument("--dataset_config_name")
    parser.add_argument("--dataset_split", default="train")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--cache_dir")
    parser.add_argument(
        "--resolution", type=int, required=True, help="Image side before encoding (smaller images are upscaled)."
    )
    parser.add_argument(
        "--on_bad_image",
        choices=ON_BAD_IMAGE,
        default="error",
        help="--train_data_dir files that cannot be read: 'error' stops before encoding, naming the file; 'skip' "
        "leaves them out (as train_diffit.py does).",
    )
    parser.add_argument(
        "--allow_empty_classes", action="store_true", help="Keep class folders without usable images (as ids)."
    )
    parser.add_argument("--flip", action="store_true", help="Also store the moments of the flipped images.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--shard_size", type=int, default=4096, help="Images per shard file.")
    parser.add_argument(
        "--dtype",
        type=dtype_name,
        choices=sorted(DTYPES),
        default="fp32",
        help="Storage dtype of the moments (float32/float16/bfloat16 are accepted too).",
    )
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    args = parser.parse_args(argv)
    if (args.train_data_dir is None) == (args.dataset_name is None):
        parser.error("pass exactly one of --train_data_dir / --dataset_name")
    if not args.train_data_dir and (args.on_bad_image != "error" or args.allow_empty_classes):
        parser.error("--on_bad_image and --allow_empty_classes apply to --train_data_dir only")
    for name in ("resolution", "batch_size", "shard_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    vae = load_vae(args.vae).to(accelerator.device).eval().requires_grad_(False)
    channels = vae.config.in_channels  # 1 for a grayscale VAE, 3 for the SD-VAE
    if args.train_data_dir is not None:
        dataset = ImageDataset.from_folder(
            args.train_data_dir,
            args.resolution,
            on_bad_image=args.on_bad_image,
            allow_empty_classes=args.allow_empty_classes,
            channels=channels,
            center_crop=True,
        )
    else:
        dataset = ImageDataset.from_hub(
            args.dataset_name,
            args.resolution,
            split=args.dataset_split,
            image_column=args.image_column,
            label_column=args.label_column,
            config_name=args.dataset_config_name,
            cache_dir=args.cache_dir,
            channels=channels,
            center_crop=True,
        )
    settings = {
        "vae": str(args.vae),  # as typed; a local folder is also recorded absolutely, for runs from other folders
        "vae_path": str(Path(args.vae).resolve()) if Path(args.vae).is_dir() else None,
        "vae_fingerprint": vae_fingerprint(vae),
        "source": str(args.train_data_dir or f"{args.dataset_name}:{args.dataset_split}"),
        "resolution": args.resolution,
        "flip": args.flip,
        "shard_size": args.shard_size,
        "dtype": str(DTYPES[args.dtype]).removeprefix("torch."),  # torch's name ("float16"), as folders always said
        "num_items": len(dataset),
        "classes": dataset.classes,
        "scaling_factor": vae.config.scaling_factor,
        "shift_factor": getattr(vae.config, "shift_factor", None),
        "latent_channels": vae.config.latent_channels,
        "latent_size": args.resolution // vae_scale_factor(vae),
    }
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    num_shards = math.ceil(len(dataset) / args.shard_size)
    names = [f"shard-{i:05d}.safetensors" for i in range(num_shards)]
    mine = range(accelerator.process_index, num_shards, accelerator.num_processes)

    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> torch.Tensor:  # [B, 3, R, R] -> moments [B, 2C, h, w]
        with accelerator.autocast():
            return vae.encode(pixels.to(accelerator.device)).latent_dist.parameters.float().cpu()

    progress = tqdm(total=len(mine), desc="shards", disable=not accelerator.is_local_main_process)
    for shard in mine:
        path = output_dir / names[shard]
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                if json.loads(f.metadata()["settings"]) != settings:
                    raise ValueError(
                        f"{path} was written with other settings; use a new --output_dir or delete it. "
                        f"Found {f.metadata()['settings']}, want {json.dumps(settings)}."
                    )
            progress.update(1)
            continue
        indices = range(shard * args.shard_size, min((shard + 1) * args.shard_size, len(dataset)))
        loader = DataLoader(
            torch.utils.data.Subset(dataset, indices),
            batch_size=args.batch_size,
            num_workers=args.dataloader_num_workers,
        )
        tensors = {"moments": [], "moments_flipped": [], "labels": []}
        for batch in loader:
            tensors["moments"].append(encode(batch["pixel_values"]))
            if args.flip:
                tensors["moments_flipped"].append(encode(batch["pixel_values"].flip(-1)))
            tensors["labels"].append(batch["class_labels"].long())
        tensors = {
            k: torch.cat(v).to(torch.long if k == "labels" else DTYPES[args.dtype]).contiguous()
            for k, v in tensors.items()
            if v
        }
        for name in ("moments", "moments_flipped"):  # e.g. a VAE in fp16 that overflows, or --dtype float16
            bad = (~torch.isfinite(tensors[name].flatten(1)).all(1)).nonzero().flatten() if name in tensors else []
            if len(bad):
                item = indices[bad[0].item()]
                source = dataset.load_image.paths[item] if args.train_data_dir else f"row {item}"
                raise ValueError(
                    f"The VAE encoded {len(bad)} image(s) of {names[shard]} to non-finite {name!r} (NaN or inf), "
                    f"the first {source}; try --mixed_precision no and --dtype fp32."
                )
        tmp = path.with_name(f".tmp-{path.name}")
        save_file(tensors, str(tmp), metadata={"settings": json.dumps(settings)})
        os.replace(tmp, path)
        progress.update(1)
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        metadata = {**settings, "shards": names}
        tmp = output_dir / ".tmp-metadata.json"
        tmp.write_text(json.dumps(metadata, indent=2))
        os.replace(tmp, output_dir / "metadata.json")
        logger.info(f"Encoded {len(dataset)} images into {num_shards} shard(s) in {output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
