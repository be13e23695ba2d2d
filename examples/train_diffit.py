#!/usr/bin/env python
"""Train or fine-tune DiffiT with 🤗 accelerate, from one CPU to many GPUs and nodes (examples/README.md).

One loop for every model kind; what a step minimises is the `--objective` (diffusers_diffit/losses.py):
- "edm": the EDM loss and preconditioning; the default for image-space models (`DiffiTUNet2DModel`, and diffusers'
  `UNet2DModel` with `--architecture unet`).
- "ddpm-hybrid": ε-MSE plus the variational-bound term for a learned variance (ADM / DiT), DDPM noising; the default
  for the latent `DiffiTTransformer2DModel`, trained on VAE latents (`--vae`, the pipeline's VAE, or `--latents_dir`).

Labels are replaced by the null class with probability `--label_dropout` (classifier-free guidance). All randomness of
a step (noise, timesteps, VAE posterior samples, label dropout, dropout) is drawn from seeds that depend only on
(--seed, optimizer step, micro-batch, process), and the data order and augmentation only on (--seed, epoch), so a run
resumed with `--resume_from_checkpoint latest` ends with the weights of an uninterrupted one.

The output is a pipeline folder that `DiffiTPipeline.from_pretrained(output_dir)` loads (EMA weights with --use_ema),
with a model card; `checkpoint-<step>` folders sit next to it.
"""

import argparse
import inspect
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.data_loader import skip_first_batches
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid, numpy_to_pil
from huggingface_hub import ModelCard
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from diffusers_diffit import (
    DIFFIT_CONFIGS,
    DIFFIT_UNET_CONFIGS,
    DiffiTPipeline,
    DiffiTTransformer2DModel,
    DiffiTUNet2DModel,
    EDMHeunScheduler,
    official_scheduler,
)
from diffusers_diffit.checkpointing import CheckpointManager, register_diffusers_hooks
from diffusers_diffit.data import ImageDataset, LatentDataset, latents_vae_location, load_vae, vae_fingerprint
from diffusers_diffit.data.digits import DIGITS_CONFIGS, DIGITS_LATENT_CONFIG
from diffusers_diffit.finetuning import default_class_map, resize_class_embedding, set_class_dropout_prob
from diffusers_diffit.hub import DIFFIT_CITATION, create_model_card, download_pipeline, push_to_hub
from diffusers_diffit.losses import OBJECTIVES
from diffusers_diffit.pipelines import RECIPE_KEYS
from diffusers_diffit.schedulers.compatibility import scheduler_support
from diffusers_diffit.seeding import derive_seed
from diffusers_diffit.utils import normalize_latents, vae_scale_factor


logger = get_logger(__name__)
MODEL_CLASSES = {cls.__name__: cls for cls in (DiffiTTransformer2DModel, DiffiTUNet2DModel, UNet2DModel)}
# Named configs: {architecture: config with its `_class_name`}; "unet" is diffusers' UNet2DModel of about the same
# size.
NAMED_CONFIGS = {
    **{name: {"diffit": {"_class_name": "DiffiTTransformer2DModel", **c}} for name, c in DIFFIT_CONFIGS.items()},
    **{name: {"diffit": {"_class_name": "DiffiTUNet2DModel", **c}} for name, c in DIFFIT_UNET_CONFIGS.items()},
    "DiffiT-digits": DIGITS_CONFIGS,
    "DiffiT-digits-latent": {"diffit": DIGITS_LATENT_CONFIG},
}
DEFAULT_OBJECTIVE = {"DiffiTTransformer2DModel": "ddpm-hybrid", "DiffiTUNet2DModel": "edm", "UNet2DModel": "edm"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, fromfile_prefix_chars="@"
    )  # `@file`: more flags, one per line (examples/digits.args)
    model = p.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", help="A DiffiT pipeline folder or Hub id to fine-tune.")
    model.add_argument(
        "--model_config_name_or_path",
        help=f"Train from scratch: a config.json, a model folder, or one of {sorted(NAMED_CONFIGS)}.",
    )
    model.add_argument(
        "--architecture",
        choices=["diffit", "unet"],
        default="diffit",
        help="unet: diffusers' UNet2DModel of about the same size as the named DiffiT config, the "
        "baseline of the digits benchmark (named configs with a U-Net: "
        f"{sorted(k for k, v in NAMED_CONFIGS.items() if 'unet' in v)}).",
    )
    model.add_argument(
        "--config_overrides",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="Replace entries of the config (from scratch), VALUE as JSON: window_size=8 "
        "block_out_channels=[48,64,64].",
    )
    model.add_argument(
        "--vae",
        help="AutoencoderKL folder / Hub id (or a pipeline with a `vae`) for latent training "
        "from scratch; default: the pretrained pipeline's VAE, or the one --latents_dir was made with.",
    )
    model.add_argument(
        "--num_classes",
        type=int,
        help="Classes of the trained model (0 = unconditional); "
        "default: the dataset's class count. Fine-tuning re-shapes the label table (see README).",
    )
    model.add_argument(
        "--objective",
        choices=sorted(OBJECTIVES),
        help="What a step minimises; default: the pretrained pipeline's kind of denoiser, or "
        f"{DEFAULT_OBJECTIVE} by model class.",
    )
    model.add_argument(
        "--recipe_from",
        help="A pipeline folder whose scheduler and sampling defaults the written "
        "pipeline takes; default: the pretrained pipeline's, or the objective's default.",
    )
    data = p.add_argument_group("data")
    data.add_argument("--train_data_dir", help="ImageFolder: one sub-folder per class, sorted names -> label ids.")
    data.add_argument("--dataset_name", help="A 🤗 datasets name (optional dependency `datasets`).")
    data.add_argument("--dataset_config_name")
    data.add_argument("--image_column", default="image")
    data.add_argument("--label_column", default="label")
    data.add_argument("--cache_dir")
    data.add_argument("--latents_dir", help="VAE moments from precompute_latents.py (no VAE encoding per step).")
    data.add_argument("--resolution", type=int, help="Image side; must match the model (default: derived from it).")
    data.add_argument("--center_crop", action="store_true", help="Centre crops (default: random crops).")
    data.add_argument("--random_flip", action="store_true")
    data.add_argument("--dataloader_num_workers", type=int, default=0)
    train = p.add_argument_group("training")
    train.add_argument("--output_dir", default="diffit-model")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--train_batch_size", type=int, default=16, help="Per device.")
    train.add_argument("--num_epochs", type=int, default=100)
    train.add_argument("--max_train_steps", type=int, help="Optimizer steps; overrides --num_epochs.")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--gradient_checkpointing", action="store_true")
    train.add_argument(
        "--label_dropout",
        type=float,
        default=0.1,
        help="Probability of training a label as the null class (classifier-free guidance).",
    )
    train.add_argument("--learning_rate", type=float, default=1e-4)
    train.add_argument("--scale_lr", action="store_true", help="Multiply the lr by batch · accumulation · processes.")
    train.add_argument(
        "--lr_scheduler",
        default="constant",
        help='"linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"',
    )
    train.add_argument("--lr_warmup_steps", type=int, default=0)
    train.add_argument("--adam_beta1", type=float, default=0.9)
    train.add_argument("--adam_beta2", type=float, default=0.999)
    train.add_argument("--adam_weight_decay", type=float, default=0.0)
    train.add_argument("--adam_epsilon", type=float, default=1e-8)
    train.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' AdamW8bit.")
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping; 0 disables.")
    train.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], help="Default: the accelerate config.")
    train.add_argument("--allow_tf32", action="store_true")
    train.add_argument("--use_ema", action="store_true", help="Keep an EMA of the weights (saved as the result).")
    train.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay (the paper's 0.9999).")
    train.add_argument(
        "--ema_warmup",
        action="store_true",
        help="Decay min(ema_decay, 1 − (1 + step)^−3/4) (diffusers' EMA warm-up), for short runs; default: constant.",
    )
    train.add_argument("--offload_ema", action="store_true", help="Keep the EMA weights in CPU memory.")
    ckpt = p.add_argument_group("checkpoints and logging")
    ckpt.add_argument("--checkpointing_steps", type=int, default=500)
    ckpt.add_argument("--checkpoints_total_limit", type=int)
    ckpt.add_argument("--resume_from_checkpoint", help='"latest" or a checkpoint-<step> folder.')
    ckpt.add_argument("--validation_steps", type=int, help="Sample and log a labelled grid every N steps.")
    ckpt.add_argument("--validation_labels", type=int, nargs="+", help="Default: the first 8 classes.")
    ckpt.add_argument("--num_validation_images", type=int, default=4, help="Per label.")
    ckpt.add_argument("--validation_inference_steps", type=int, default=50)
    ckpt.add_argument("--validation_guidance_scale", type=float, default=1.0)
    ckpt.add_argument("--report_to", default="tensorboard", help='"tensorboard", "wandb", "all" or "none".')
    ckpt.add_argument("--logging_dir", default="logs", help="Relative to --output_dir.")
    ckpt.add_argument("--tracker_project_name", default="train_diffit")
    ckpt.add_argument("--push_to_hub", action="store_true")
    ckpt.add_argument("--hub_model_id", help="Default: the name of --output_dir.")
    ckpt.add_argument("--hub_private_repo", action="store_true")
    ckpt.add_argument("--license", help='Model-card licence; default: the base model\'s, else "other".')
    args = p.parse_args(argv)

    if (args.pretrained_model_name_or_path is None) == (args.model_config_name_or_path is None):
        p.error(
            "pass exactly one of --pretrained_model_name_or_path (fine-tune) / "
            "--model_config_name_or_path (from scratch)"
        )
    if sum(x is not None for x in (args.train_data_dir, args.dataset_name, args.latents_dir)) != 1:
        p.error("pass exactly one of --train_data_dir / --dataset_name / --latents_dir")
    for name in ("train_batch_size", "gradient_accumulation_steps", "num_epochs", "checkpointing_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.num_classes is not None and args.num_classes < 0:
        p.error(f"--num_classes must be >= 0 (0 = unconditional), got {args.num_classes}")
    if not 0 <= args.label_dropout < 1:
        p.error(f"--label_dropout must be in [0, 1), got {args.label_dropout}")
    if not 0 <= args.ema_decay < 1:
        p.error(f"--ema_decay must be in [0, 1), got {args.ema_decay}")
    if args.latents_dir and args.center_crop:
        p.error("--center_crop does not apply to --latents_dir (latents were cropped when they were encoded)")
    if args.recipe_from and not (Path(args.recipe_from) / "model_index.json").is_file():
        p.error(f"--recipe_from {args.recipe_from!r} is not a pipeline folder (no model_index.json)")
    if args.pretrained_model_name_or_path and (args.architecture != "diffit" or args.config_overrides):
        p.error("--architecture and --config_overrides apply to training from scratch only")
    try:
        args.config_overrides = dict(_parse_override(item) for item in args.config_overrides)
    except ValueError as e:
        p.error(f"--config_overrides: {e}")
    return args


def _parse_override(item: str) -> tuple[str, object]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE, got {item!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        raise ValueError(f"the value of {key!r} is not JSON: {value!r} (strings need quotes)") from None


def scratch_config(name: str, architecture: str, overrides: dict) -> tuple[type, dict]:
    """--model_config_name_or_path (+ --architecture, --config_overrides) -> (model class, config without diffusers'
    private keys)."""
    if name in NAMED_CONFIGS:
        if architecture not in NAMED_CONFIGS[name]:
            with_unet = sorted(k for k, v in NAMED_CONFIGS.items() if architecture in v)
            raise ValueError(f"`--architecture` {architecture!r} has no config named {name!r}; it has {with_unet}.")
        config = NAMED_CONFIGS[name][architecture]
    else:
        path = Path(name)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ValueError(
                f"`--model_config_name_or_path` {name!r} is not a config file, a model folder, or one of "
                f"{sorted(NAMED_CONFIGS)}."
            )
        config = json.loads(path.read_text())
    class_name = config.get("_class_name")
    if class_name not in MODEL_CLASSES:
        raise ValueError(f"{name} has `_class_name` {class_name!r}; allowed: {sorted(MODEL_CLASSES)}.")
    model_cls = MODEL_CLASSES[class_name]
    unknown = sorted(set(overrides) - set(inspect.signature(model_cls.__init__).parameters))
    if unknown:
        raise ValueError(f"`--config_overrides` {unknown} are not {class_name} config entries.")
    return model_cls, {**{k: v for k, v in config.items() if not k.startswith("_")}, **overrides}


def default_recipe(objective: str, config: dict) -> tuple:
    """(scheduler, sampling defaults) a new pipeline ships with: EDM Heun with 18 steps for an EDM denoiser (the
    paper's CIFAR-10 setting); for a DDPM one SPEC.md §3's DDPM (learned-range variance when the model predicts it)
    with the release's 250 steps, no guidance."""
    if objective == "edm":
        return EDMHeunScheduler(), {"num_inference_steps": 18}
    scheduler = official_scheduler()
    if config.get("out_channels") != 2 * config["in_channels"]:
        scheduler = DDPMScheduler.from_config(scheduler.config, variance_type="fixed_small")
    return scheduler, {"num_inference_steps": 250}


@dataclass
class Start:
    """What a run starts from: the model's class and config (and the pretrained pipeline when fine-tuning), what a
    step minimises, what the written pipeline samples with, and the VAE for latent models."""

    model_cls: type
    config: dict
    pipe: DiffiTPipeline | None = None
    vae: object | None = None
    objective: object = None  # set once the scheduler of the written pipeline is known
    scheduler: object = None
    recipe: dict | None = None
    license: str = "other"
    base_model: str | None = None  # a Hub id, for the model card


def starting_point(args) -> Start:
    """A pretrained pipeline (fine-tuning) or a config (from scratch); the objective, checked against the scheduler
    the written pipeline will sample with; the VAE."""
    if args.pretrained_model_name_or_path:
        folder = download_pipeline(args.pretrained_model_name_or_path)
        pipe = DiffiTPipeline.from_pretrained(folder)
        card = Path(folder) / "README.md"
        start = Start(
            type(pipe.transformer),
            dict(pipe.transformer.config),
            pipe,
            pipe.vae,
            license=(ModelCard.load(card).data.license if card.is_file() else None) or "other",  # kept when tuning
            base_model=None
            if Path(args.pretrained_model_name_or_path).is_dir()
            else args.pretrained_model_name_or_path,
        )
        default_objective = next(k for k, v in OBJECTIVES.items() if v.denoiser_type == pipe.denoiser_type)
    else:
        model_cls, config = scratch_config(args.model_config_name_or_path, args.architecture, args.config_overrides)
        start = Start(model_cls, config)
        default_objective = DEFAULT_OBJECTIVE[model_cls.__name__]
    objective_cls = OBJECTIVES[args.objective or default_objective]
    recipe_pipe = DiffiTPipeline.from_pretrained(args.recipe_from) if args.recipe_from else start.pipe
    if recipe_pipe is not None:
        start.scheduler, start.recipe = recipe_pipe.scheduler, {k: recipe_pipe.config[k] for k in RECIPE_KEYS}
    else:
        start.scheduler, start.recipe = default_recipe(objective_cls.name, start.config)
    reason = scheduler_support(type(start.scheduler), objective_cls.denoiser_type)
    if reason is not None:
        raise ValueError(
            f"`--objective` {objective_cls.name!r} trains a {objective_cls.denoiser_type!r} denoiser, but "
            f"the written pipeline would sample with {type(start.scheduler).__name__} ({reason}); "
            "pass --recipe_from a pipeline whose scheduler fits, or another --objective."
        )
    start.objective = objective_cls.from_scheduler(start.scheduler)

    if args.vae:
        start.vae = load_vae(args.vae)
    elif start.vae is None and args.latents_dir:  # the VAE the latents were made with
        start.vae = load_vae(latents_vae_location(args.latents_dir))
    if start.vae is not None:
        if start.vae.config.latent_channels != start.config["in_channels"]:
            raise ValueError(
                f"The VAE has {start.vae.config.latent_channels} latent channels but the model takes "
                f"{start.config['in_channels']}."
            )
        start.vae.requires_grad_(False).eval()
    return start


def check_latents(latents_dir: str, metadata: dict, vae, resolution: int) -> None:
    """Cached latents must come from this run's VAE (weights, scaling and shift factor: the fingerprint stored by
    precompute_latents.py; caches without one are checked by their scaling factor) at this run's resolution."""
    if metadata["resolution"] != resolution:
        raise ValueError(
            f"--latents_dir {latents_dir} was encoded at {metadata['resolution']} px; this run needs {resolution} px."
        )
    recorded = metadata.get("vae_fingerprint")
    if recorded is not None and recorded != vae_fingerprint(vae):
        raise ValueError(
            f"--latents_dir {latents_dir} was encoded with another VAE ({metadata['vae']!r}, scaling factor "
            f"{metadata['scaling_factor']}, shift factor {metadata.get('shift_factor')}) than this run's "
            f"(scaling factor {vae.config.scaling_factor}, shift factor {vae.config.shift_factor}): encode the "
            "latents again with this VAE, or train with theirs."
        )
    if recorded is None and metadata["scaling_factor"] != vae.config.scaling_factor:
        raise ValueError(
            f"--latents_dir {latents_dir} was encoded with scaling factor {metadata['scaling_factor']}; this run's "
            f"VAE has {vae.config.scaling_factor}."
        )


def check_classes(args, classes: list[str] | None) -> tuple[int, dict | None]:
    """(number of classes of the trained model, its id2label) from the dataset and --num_classes."""
    num_classes = args.num_classes if args.num_classes is not None else len(classes or [])
    if num_classes and classes is None:
        raise ValueError("`--num_classes` > 0 needs a labelled dataset (one sub-folder / label per class).")
    if num_classes and num_classes < len(classes):
        raise ValueError(f"`--num_classes` {num_classes} is smaller than the dataset's {len(classes)} classes.")
    if args.validation_steps:  # fail now, not at the first validation
        bad = [y for y in args.validation_labels or [] if not 0 <= y < num_classes]
        if bad:
            raise ValueError(f"`--validation_labels` {bad} must be class ids in [0, {num_classes}).")
        if not num_classes and args.validation_guidance_scale != 1:
            raise ValueError("`--validation_guidance_scale` must be 1 for an unconditional model.")
    id2label = {i: classes[i] if i < len(classes) else str(i) for i in range(num_classes)} if num_classes else None
    return num_classes, id2label


def build_model(args, start: Start, classes: list[str] | None, num_classes: int) -> torch.nn.Module:
    """The pretrained model with its label table re-shaped for the dataset's classes, or a new one."""
    if start.pipe is not None:
        model, old = start.pipe.transformer, start.config["num_classes"]
        class_map = default_class_map(classes, start.pipe.id2label, old, num_classes)
        if num_classes != old or class_map != list(range(num_classes)):
            kept = sum(j is not None for j in class_map)
            logger.info(
                f"Label table: {old} -> {num_classes} classes, {kept} kept, {num_classes - kept} new (they "
                "start from the null row)"
            )
            resize_class_embedding(model, num_classes, class_map)
        start.pipe = None  # only the model is trained on
    elif start.model_cls is UNet2DModel:  # diffusers' class table; its last row is the null class
        model = UNet2DModel.from_config({**start.config, "num_class_embeds": num_classes + 1 if num_classes else None})
        model.register_to_config(num_classes=num_classes)  # what DiffiTPipeline reads
    else:
        model = start.model_cls.from_config({**start.config, "num_classes": num_classes})
    if isinstance(model, (DiffiTTransformer2DModel, DiffiTUNet2DModel)):
        set_class_dropout_prob(model, 0.0)  # labels are dropped by the training step, the same way for every model
    logger.info(f"{type(model).__name__}: {model.num_parameters():,} parameters")
    return model


def make_optimizer(args, model: torch.nn.Module, total_batch: int) -> torch.optim.Optimizer:
    """AdamW (bitsandbytes' 8-bit one with --use_8bit_adam); --scale_lr multiplies the lr by the total batch."""
    lr = args.learning_rate * total_batch if args.scale_lr else args.learning_rate
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from e
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    return optimizer_cls(
        model.parameters(),
        lr=lr,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def model_card_text(args, model_cls, objective, num_items, num_classes, steps, total_batch) -> str:
    base = args.pretrained_model_name_or_path
    if base is None:
        origin = "trained from scratch"
    elif Path(base).is_dir():
        origin = f"fine-tuned from the pipeline in `{base}`"
    else:
        origin = f"fine-tuned from [{base}](https://huggingface.co/{base})"
    data = args.train_data_dir or args.dataset_name or f"latents in {args.latents_dir}"
    labels = "[0, 1]" if num_classes else "None"
    ema = f"EMA {args.ema_decay}{' with warm-up' if args.ema_warmup else ''} (these are the EMA weights)"
    dropout = f", label dropout {args.label_dropout}" if num_classes else ""
    return f"""# DiffiT ({model_cls.__name__})

[DiffiT](https://arxiv.org/abs/2312.02139) {origin} with `examples/train_diffit.py` of diffusers-diffit.

- data: {data} ({num_items} items, {num_classes or "no"} classes{dropout})
- objective: `{objective.name}` (diffusers_diffit/losses.py)
- {steps} optimizer steps of batch {total_batch}, learning rate {args.learning_rate} ({args.lr_scheduler}),
  {ema if args.use_ema else "no EMA"}, seed {args.seed}

## Usage

```python
import torch
from diffusers_diffit import DiffiTPipeline

pipe = DiffiTPipeline.from_pretrained("{args.hub_model_id or args.output_dir}")
images = pipe(class_labels={labels}, generator=torch.manual_seed(0)).images
```

## Citation

```bibtex
{DIFFIT_CITATION}
```
"""


def build_dataset(args, resolution: int, channels: int):
    if args.latents_dir:
        return LatentDataset(args.latents_dir, random_flip=args.random_flip, seed=args.seed)
    kwargs = dict(channels=channels, center_crop=args.center_crop, random_flip=args.random_flip, seed=args.seed)
    if args.train_data_dir:
        return ImageDataset.from_folder(args.train_data_dir, resolution, **kwargs)
    return ImageDataset.from_hub(
        args.dataset_name,
        resolution,
        image_column=args.image_column,
        label_column=args.label_column,
        config_name=args.dataset_config_name,
        cache_dir=args.cache_dir,
        **kwargs,
    )


def validate(pipeline: DiffiTPipeline, args, num_classes: int, step: int, accelerator, output_dir: Path):
    """Sample a labelled grid with the pipeline's scheduler; save it and send it to the trackers."""
    pipeline.set_progress_bar_config(disable=True)
    labels = (args.validation_labels or list(range(min(num_classes, 8)))) if num_classes else []
    images = pipeline(
        class_labels=labels or None,
        num_images_per_label=args.num_validation_images,
        num_inference_steps=args.validation_inference_steps,
        guidance_scale=args.validation_guidance_scale,
        generator=torch.Generator(accelerator.device).manual_seed(args.seed),
        output_type="np",
    ).images
    grid = make_image_grid(numpy_to_pil(images), rows=max(len(labels), 1), cols=args.num_validation_images)
    (output_dir / "samples").mkdir(exist_ok=True)
    grid.save(output_dir / "samples" / f"step-{step:07d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", images, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(grid, caption=f"labels {labels}")]}, step=step)


def main(argv=None):
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
        # one shuffle per epoch from (seed, epoch); the datasets draw their augmentation from (seed, epoch, index)
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:  # e.g. torchrun on a machine without GPUs and without --cpu
        raise ValueError(
            f"{launched} processes were launched but accelerate runs {accelerator.num_processes}; on CPUs "
            "launch with ACCELERATE_USE_CPU=1 (see examples/README.md)."
        )
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(args.seed)  # the model's initialisation

    start = starting_point(args)
    vae, config = start.vae, start.config
    resolution = config["sample_size"] * vae_scale_factor(vae)
    if args.resolution is not None and args.resolution != resolution:
        raise ValueError(
            f"`--resolution` {args.resolution} does not match the model: it trains at {resolution} px "
            f"(sample_size {config['sample_size']}{' × the VAE factor' if vae else ''})."
        )
    dataset = build_dataset(args, resolution, vae.config.in_channels if vae is not None else config["in_channels"])
    if args.latents_dir:
        check_latents(args.latents_dir, dataset.metadata, vae, resolution)
    num_classes, id2label = check_classes(args, dataset.classes)
    model = build_model(args, start, dataset.classes, num_classes)
    if accelerator.is_main_process:  # every check has passed: the first thing written
        output_dir.mkdir(parents=True, exist_ok=True)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    ema = None
    if args.use_ema:  # the first update copies the weights
        warmup = dict(use_ema_warmup=True, power=3 / 4) if args.ema_warmup else dict(min_decay=args.ema_decay)
        ema = EMAModel(
            model.parameters(), decay=args.ema_decay, model_cls=type(model), model_config=model.config, **warmup
        )
    objective = start.objective

    # ---- optimisation
    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    optimizer = make_optimizer(args, model, total_batch)
    train_dataloader = DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.dataloader_num_workers,
    )
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    if len(train_dataloader) == 0:
        raise ValueError(
            f"The dataset ({len(dataset)} items) has less than one batch per process "
            f"({args.train_batch_size} × {accelerator.num_processes})."
        )
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    if ema is not None and not args.ema_warmup and args.ema_decay**max_train_steps > 0.05:
        # measured on digits-latent: 4000 steps at the default 0.9999 save 67 % initial weights and sample noise
        logger.warning(
            f"--ema_decay {args.ema_decay} without --ema_warmup over {max_train_steps} steps: the saved EMA weights "
            f"will still be {args.ema_decay**max_train_steps:.0%} the initial ones. Pass --ema_warmup or a lower "
            "--ema_decay for a run this short."
        )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    lr_scheduler = accelerator.prepare(lr_scheduler)
    ema_device = "cpu" if args.offload_ema else accelerator.device
    if ema is not None:
        ema.to(ema_device)
    if vae is not None:  # fp32 weights (saved with the pipeline), encoding under autocast
        vae.to(accelerator.device)

    def make_pipeline(transformer) -> DiffiTPipeline:
        return DiffiTPipeline(
            transformer=transformer, scheduler=start.scheduler, vae=vae, id2label=id2label, **start.recipe
        )

    # ---- checkpoints and resuming
    register_diffusers_hooks(accelerator, ema, ema_device)
    checkpoints = CheckpointManager(output_dir, accelerator, args.checkpoints_total_limit)
    checkpoints.remove_partial()
    global_step = 0
    if args.resume_from_checkpoint:
        path = checkpoints.resolve(args.resume_from_checkpoint)
        if path is None:
            logger.info("No complete checkpoint yet; starting a new run.")
        else:
            accelerator.load_state(str(path))
            global_step = CheckpointManager.step_of(path)
            logger.info(f"Resumed from {path} at step {global_step}")
    if accelerator.is_main_process:
        tracked = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
        accelerator.init_trackers(args.tracker_project_name, config=tracked)
    logger.info(
        f"{len(dataset)} items, {num_classes or 'no'} classes, {max_train_steps} steps of {total_batch} "
        f"(batch {args.train_batch_size} × {accelerator.num_processes} processes × "
        f"{args.gradient_accumulation_steps} accumulation), objective {objective.name}, "
        f"{'latent' if vae is not None else 'pixel'} space"
    )

    def compute_loss(batch, seed: int) -> tuple[torch.Tensor, dict]:
        generator = torch.Generator(accelerator.device).manual_seed(seed)
        torch.manual_seed(seed)  # randomness inside the model (dropout)
        if "moments" in batch:
            x0 = normalize_latents(vae, DiagonalGaussianDistribution(batch["moments"]).sample(generator))
        elif vae is not None:
            with torch.no_grad(), accelerator.autocast():
                moments = vae.encode(batch["pixel_values"]).latent_dist.parameters.float()
            x0 = normalize_latents(vae, DiagonalGaussianDistribution(moments).sample(generator))
        else:
            x0 = batch["pixel_values"]
        labels = None
        if num_classes:  # classifier-free guidance: some labels become the null class
            labels = batch["class_labels"]
            dropped = torch.rand(labels.shape, generator=generator, device=labels.device) < args.label_dropout
            labels = torch.where(dropped, num_classes, labels)
        return objective(model, x0, labels, generator)

    # ---- the loop
    first_epoch, skip_batches = divmod(global_step, steps_per_epoch)
    skip_batches *= args.gradient_accumulation_steps
    progress = tqdm(
        range(max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    micro_step, timed_steps, clock = 0, 0, None
    for epoch in range(first_epoch, num_epochs):
        if global_step >= max_train_steps:
            break
        train_dataloader.set_epoch(epoch)  # the sampler's shuffle and the dataset's augmentation
        loader = train_dataloader
        if epoch == first_epoch and skip_batches:  # resumed inside an epoch
            loader = skip_first_batches(train_dataloader, skip_batches)
        for batch in loader:
            with accelerator.accumulate(model):
                seed = derive_seed(args.seed, global_step, micro_step, accelerator.process_index)
                loss, extra = compute_loss(batch, seed)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            micro_step += 1
            if not accelerator.sync_gradients:
                continue
            micro_step = 0
            if ema is not None:
                if args.offload_ema:
                    ema.to(accelerator.device, non_blocking=True)
                ema.step(model.parameters())
                if args.offload_ema:
                    ema.to("cpu", non_blocking=True)
            global_step += 1
            progress.update(1)
            if clock is None:
                clock = time.perf_counter()  # throughput is timed from the end of the first step
            else:
                timed_steps += 1
            logs = {
                "loss": accelerator.gather(loss.detach()).mean().item(),
                "lr": lr_scheduler.get_last_lr()[0],
                **extra,
            }
            if ema is not None:
                logs["ema_decay"] = ema.cur_decay_value
            progress.set_postfix(loss=f"{logs['loss']:.4f}")
            accelerator.log(logs, step=global_step)
            if global_step % args.checkpointing_steps == 0:
                checkpoints.save(global_step)
            if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                trained = accelerator.unwrap_model(model)
                if ema is not None:
                    ema.store(trained.parameters())
                    ema.copy_to(trained.parameters())
                validate(make_pipeline(trained.eval()), args, num_classes, global_step, accelerator, output_dir)
                trained.train()
                if ema is not None:
                    ema.restore(trained.parameters())
            if global_step >= max_train_steps:
                break
    progress.close()
    if timed_steps:
        logger.info(f"Throughput: {timed_steps / (time.perf_counter() - clock):.3f} steps/s over {timed_steps} steps")

    # ---- the result: a pipeline folder (EMA weights with --use_ema)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        if ema is not None:
            ema.copy_to(final.parameters())
        make_pipeline(final.eval()).save_pretrained(output_dir)
        text = model_card_text(
            args, start.model_cls, objective, len(dataset), num_classes, max_train_steps, total_batch
        )
        card = create_model_card(
            output_dir,
            text,
            license=args.license or start.license,
            base_model=start.base_model,
            tags=[
                "diffit",
                "diffusers-diffit",
                "image-generation",
                "class-conditional" if num_classes else "unconditional-image-generation",
            ],
        )
        card.save(output_dir / "README.md")
        logger.info(f"Saved the pipeline to {output_dir}")
        if args.push_to_hub:
            plan = push_to_hub(
                output_dir,
                args.hub_model_id or output_dir.resolve().name,
                private=args.hub_private_repo,
                commit_message=f"DiffiT trained for {max_train_steps} steps with train_diffit.py",
                ignore_patterns=["checkpoint-*", ".tmp-*", ".trash-*", f"{args.logging_dir}/*"],
            )
            logger.info(f"Pushed {len(plan.files)} files: {plan.commit_url}")
    accelerator.end_training()


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:  # a bad argument or input, found before training: one line, exit status 2
        print(f"train_diffit.py: error: {error}", file=sys.stderr)
        sys.exit(2)
