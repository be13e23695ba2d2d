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
resumed with `--resume_from_checkpoint latest` ends with the weights of an uninterrupted one. On SIGTERM (a cluster's
preemption) the run finishes its step, saves a checkpoint and exits with status 143.

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
from diffusers import AutoencoderKL, DDPMScheduler, SchedulerMixin, UNet2DModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid, numpy_to_pil
from huggingface_hub import ModelCard
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from diffusers_diffit import (
    DiffiTPipeline,
    DiffiTTransformer2DModel,
    DiffiTUNet2DModel,
    EDMHeunScheduler,
    official_scheduler,
)
from diffusers_diffit.checkpointing import (
    PREEMPTED_EXIT_STATUS,
    CheckpointManager,
    SigtermFlag,
    register_diffusers_hooks,
)
from diffusers_diffit.configs import MODEL_CONFIGS
from diffusers_diffit.data import (
    ON_BAD_IMAGE,
    ImageDataset,
    LatentDataset,
    latents_vae_location,
    load_vae,
    vae_fingerprint,
)
from diffusers_diffit.finetuning import (
    class_rows_state_dict,
    class_table,
    default_class_map,
    resize_class_embedding,
    set_class_dropout_prob,
    train_class_rows,
)
from diffusers_diffit.hub import DIFFIT_CITATION, create_model_card, download_pipeline, push_to_hub
from diffusers_diffit.losses import OBJECTIVES, DDPMHybridObjective, EDMObjective
from diffusers_diffit.pipelines import RECIPE_KEYS
from diffusers_diffit.schedulers.compatibility import scheduler_support
from diffusers_diffit.seeding import derive_seed
from diffusers_diffit.utils import normalize_latents, vae_scale_factor


logger = get_logger(__name__)
MODEL_CLASSES = {cls.__name__: cls for cls in (DiffiTTransformer2DModel, DiffiTUNet2DModel, UNet2DModel)}
# The named configurations (diffusers_diffit/configs.py) as {architecture: config with its `_class_name`}; "unet" is
# the digits benchmark's baseline, diffusers' UNet2DModel of about the same size.
NAMED_CONFIGS = {
    name: {"diffit": {"_class_name": cls.__name__, **config}}
    for name, (cls, config) in MODEL_CONFIGS.items()
    if cls is not UNet2DModel
}
NAMED_CONFIGS["DiffiT-digits"]["unet"] = {"_class_name": "UNet2DModel", **MODEL_CONFIGS["UNet2D-digits"][1]}
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
        "default: the dataset's class count. Fine-tuning re-shapes the label table (see docs/training.md).",
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
    model.add_argument(
        "--lora_rank",
        type=int,
        help="Fine-tune a LoRA adapter of this rank (PEFT) instead of every weight; the output is the adapter "
        "(pytorch_lora_weights.safetensors, with the label rows of new classes) for `pipe.load_lora_weights`.",
    )
    model.add_argument("--lora_alpha", type=float, help="LoRA alpha (scale alpha / rank); default: the rank.")
    model.add_argument(
        "--lora_layers",
        default="to_q,to_k,to_v,to_out",
        help="Comma-separated module names the adapter wraps (default: TMSA's spatial q/k/v/out; the time-token "
        "projections are to_q_time,to_k_time,to_v_time, the MLP ff.net.0.proj,ff.net.2, the timestep embedder "
        "linear_1,linear_2, the output proj_out; see diffusers_diffit/loaders/lora_diffit.py).",
    )
    data = p.add_argument_group("data")
    data.add_argument("--train_data_dir", help="ImageFolder: one sub-folder per class, sorted names -> label ids.")
    data.add_argument("--dataset_name", help="A 🤗 datasets name (optional dependency `datasets`).")
    data.add_argument("--dataset_config_name")
    data.add_argument("--image_column", default="image")
    data.add_argument("--label_column", default="label")
    data.add_argument("--cache_dir")
    data.add_argument("--latents_dir", help="VAE moments from precompute_latents.py (no VAE encoding per step).")
    data.add_argument(
        "--on_bad_image",
        choices=ON_BAD_IMAGE,
        default="error",
        help="--train_data_dir files that cannot be read (empty, corrupt, truncated, an unsupported mode): 'error' "
        "stops before training, naming the file; 'skip' leaves them out, logging each and the count.",
    )
    data.add_argument(
        "--allow_empty_classes",
        action="store_true",
        help="Keep class folders without (usable) images as classes with no data, so the ids after them do not "
        "change; default: an error naming them.",
    )
    data.add_argument(
        "--resolution",
        type=int,
        help="Image side; must match the model (default: derived from it). Smaller images are upscaled (bicubic).",
    )
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
    check_args(p, args)
    return args


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """The checks of the flags on their own (a usage error, exit status 2). What needs the model or the data loaded is
    checked by `check_inputs`; both run before any model is built or folder written."""
    if (args.pretrained_model_name_or_path is None) == (args.model_config_name_or_path is None):
        parser.error(
            "pass exactly one of --pretrained_model_name_or_path (fine-tune) / "
            "--model_config_name_or_path (from scratch)"
        )
    if sum(x is not None for x in (args.train_data_dir, args.dataset_name, args.latents_dir)) != 1:
        parser.error("pass exactly one of --train_data_dir / --dataset_name / --latents_dir")
    for name in ("train_batch_size", "gradient_accumulation_steps", "num_epochs", "checkpointing_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.num_classes is not None and args.num_classes < 0:
        parser.error(f"--num_classes must be >= 0 (0 = unconditional), got {args.num_classes}")
    if not 0 <= args.label_dropout < 1:
        parser.error(f"--label_dropout must be in [0, 1), got {args.label_dropout}")
    if not 0 <= args.ema_decay < 1:
        parser.error(f"--ema_decay must be in [0, 1), got {args.ema_decay}")
    if not args.train_data_dir and (args.on_bad_image != "error" or args.allow_empty_classes):
        parser.error("--on_bad_image and --allow_empty_classes apply to --train_data_dir only")
    if args.latents_dir and args.center_crop:
        parser.error("--center_crop does not apply to --latents_dir (latents were cropped when they were encoded)")
    if args.recipe_from and not (Path(args.recipe_from) / "model_index.json").is_file():
        parser.error(f"--recipe_from {args.recipe_from!r} is not a pipeline folder (no model_index.json)")
    if args.lora_rank is not None:
        if args.lora_rank < 1 or not args.pretrained_model_name_or_path:
            parser.error(
                f"--lora_rank must be >= 1 and fine-tune a --pretrained_model_name_or_path, got {args.lora_rank}"
            )
        if args.use_ema or args.adam_weight_decay:
            parser.error(
                "--lora_rank trains without --use_ema and with --adam_weight_decay 0 (decay would move the label "
                "rows kept from the base model)"
            )
        args.lora_layers = [name.strip() for name in args.lora_layers.split(",") if name.strip()]
    elif args.lora_alpha is not None:
        parser.error("--lora_alpha needs --lora_rank")
    if args.pretrained_model_name_or_path and (args.architecture != "diffit" or args.config_overrides):
        parser.error("--architecture and --config_overrides apply to training from scratch only")
    try:
        args.config_overrides = dict(_parse_override(item) for item in args.config_overrides)
    except ValueError as e:
        parser.error(f"--config_overrides: {e}")


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
    paper's CIFAR-10 setting); for a DDPM one NVIDIA's DDPM (learned-range variance when the model predicts it)
    with the release's 250 steps, no guidance."""
    if objective == "edm":
        return EDMHeunScheduler(), {"num_inference_steps": 18}
    scheduler = official_scheduler()
    if config.get("out_channels") != 2 * config["in_channels"]:
        scheduler = DDPMScheduler.from_config(scheduler.config, variance_type="fixed_small")
    return scheduler, {"num_inference_steps": 250}


@dataclass
class RunSpec:
    """What a run trains and what it writes: the model's class and config (and the pretrained pipeline when
    fine-tuning), the VAE of a latent model, what a step minimises, the scheduler and sampling defaults of the written
    pipeline, and the licence and base model of its model card."""

    model_cls: type
    config: dict
    pretrained: DiffiTPipeline | None = None
    vae: AutoencoderKL | None = None
    objective: EDMObjective | DDPMHybridObjective | None = (
        None  # set once the scheduler of the written pipeline is known
    )
    scheduler: SchedulerMixin | None = None
    recipe: dict | None = None
    license: str = "other"
    base_model: str | None = None  # a Hub id, for the model card
    initial_class_table: torch.Tensor | None = None  # --lora_rank: the label table before training

    @property
    def resolution(self) -> int:
        """The side of the training images: the model's sample size, times the VAE's factor for a latent model."""
        return self.config["sample_size"] * vae_scale_factor(self.vae)


def load_run_spec(args) -> RunSpec:
    """A pretrained pipeline (fine-tuning) or a config (from scratch); the objective, checked against the scheduler
    the written pipeline will sample with; the VAE."""
    if args.pretrained_model_name_or_path:
        folder = download_pipeline(args.pretrained_model_name_or_path)
        pipe = DiffiTPipeline.from_pretrained(folder)
        card = Path(folder) / "README.md"
        spec = RunSpec(
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
        spec = RunSpec(model_cls, config)
        default_objective = DEFAULT_OBJECTIVE[model_cls.__name__]
    objective_cls = OBJECTIVES[args.objective or default_objective]
    recipe_pipe = DiffiTPipeline.from_pretrained(args.recipe_from) if args.recipe_from else spec.pretrained
    if recipe_pipe is not None:
        spec.scheduler, spec.recipe = recipe_pipe.scheduler, {k: recipe_pipe.config[k] for k in RECIPE_KEYS}
    else:
        spec.scheduler, spec.recipe = default_recipe(objective_cls.name, spec.config)
    reason = scheduler_support(type(spec.scheduler), objective_cls.denoiser_type)
    if reason is not None:
        raise ValueError(
            f"`--objective` {objective_cls.name!r} trains a {objective_cls.denoiser_type!r} denoiser, but "
            f"the written pipeline would sample with {type(spec.scheduler).__name__} ({reason}); "
            "pass --recipe_from a pipeline whose scheduler fits, or another --objective."
        )
    spec.objective = objective_cls.from_scheduler(spec.scheduler)

    if args.vae:
        spec.vae = load_vae(args.vae)
    elif spec.vae is None and args.latents_dir:  # the VAE the latents were made with
        spec.vae = load_vae(latents_vae_location(args.latents_dir))
    if spec.vae is not None:
        if spec.vae.config.latent_channels != spec.config["in_channels"]:
            raise ValueError(
                f"The VAE has {spec.vae.config.latent_channels} latent channels but the model takes "
                f"{spec.config['in_channels']}."
            )
        spec.vae.requires_grad_(False).eval()
    return spec


def make_accelerator(args) -> Accelerator:
    """The accelerator, checked against what was launched."""
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
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:  # e.g. torchrun on a machine without GPUs and without --cpu
        raise ValueError(
            f"{launched} processes were launched but accelerate runs {accelerator.num_processes}; on CPUs "
            "launch with ACCELERATE_USE_CPU=1 (see examples/README.md)."
        )
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def build_dataset(args, spec: RunSpec):
    """The training items at the model's resolution: cached latents, an image folder or a 🤗 dataset."""
    if args.resolution is not None and args.resolution != spec.resolution:  # before the folder is scanned
        raise ValueError(
            f"`--resolution` {args.resolution} does not match the model: it trains at {spec.resolution} px "
            f"(sample_size {spec.config['sample_size']}{' × the VAE factor' if spec.vae else ''})."
        )
    if args.latents_dir:
        return LatentDataset(args.latents_dir, random_flip=args.random_flip, seed=args.seed)
    channels = spec.vae.config.in_channels if spec.vae is not None else spec.config["in_channels"]
    kwargs = dict(channels=channels, center_crop=args.center_crop, random_flip=args.random_flip, seed=args.seed)
    if args.train_data_dir:
        return ImageDataset.from_folder(
            args.train_data_dir,
            spec.resolution,
            on_bad_image=args.on_bad_image,
            allow_empty_classes=args.allow_empty_classes,
            **kwargs,
        )
    return ImageDataset.from_hub(
        args.dataset_name,
        spec.resolution,
        image_column=args.image_column,
        label_column=args.label_column,
        config_name=args.dataset_config_name,
        cache_dir=args.cache_dir,
        **kwargs,
    )


def check_inputs(args, accelerator: Accelerator, spec: RunSpec, dataset) -> tuple[int, dict | None]:
    """The checks of the loaded model and data against the flags; returns (number of classes of the trained model,
    its id2label)."""
    if args.latents_dir:
        check_latents(args.latents_dir, dataset.metadata, spec.vae, spec.resolution)
    if len(dataset) < args.train_batch_size * accelerator.num_processes:  # batches are full (drop_last)
        raise ValueError(
            f"The dataset ({len(dataset)} items) has less than one batch per process "
            f"({args.train_batch_size} × {accelerator.num_processes})."
        )
    return check_classes(args, dataset.classes)


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


def build_model(args, spec: RunSpec, classes: list[str] | None, num_classes: int) -> torch.nn.Module:
    """The pretrained model with its label table re-shaped for the dataset's classes, or a new one; in training mode,
    with gradient checkpointing when asked."""
    if spec.pretrained is not None:
        model, old = spec.pretrained.transformer, spec.config["num_classes"]
        class_map = default_class_map(classes, spec.pretrained.id2label, old, num_classes)
        if num_classes != old or class_map != list(range(num_classes)):
            kept = sum(j is not None for j in class_map)
            logger.info(
                f"Label table: {old} -> {num_classes} classes, {kept} kept, {num_classes - kept} new (they "
                "start from the null row)"
            )
            resize_class_embedding(model, num_classes, class_map)
        if args.lora_rank:
            spec.initial_class_table = add_lora(args, model, [i for i, j in enumerate(class_map) if j is None])
        spec.pretrained = None  # only the model is trained on
    elif spec.model_cls is UNet2DModel:  # diffusers' class table; its last row is the null class
        model = UNet2DModel.from_config({**spec.config, "num_class_embeds": num_classes + 1 if num_classes else None})
        model.register_to_config(num_classes=num_classes)  # what DiffiTPipeline reads
    else:
        model = spec.model_cls.from_config({**spec.config, "num_classes": num_classes})
    if isinstance(model, (DiffiTTransformer2DModel, DiffiTUNet2DModel)):
        set_class_dropout_prob(model, 0.0)  # labels are dropped by the training step, the same way for every model
    logger.info(f"{type(model).__name__}: {model.num_parameters():,} parameters")
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


def add_lora(args, model: torch.nn.Module, new_rows: list[int]) -> torch.Tensor | None:
    """--lora_rank: freeze the model and add a LoRA adapter (PEFT) on --lora_layers; the label rows of classes the
    base never saw are trained too (the others, the null row among them, stay). Returns the label table before
    training (None without new classes), against which the saved rows are picked."""
    model.requires_grad_(False)
    config = LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha or args.lora_rank,
        init_lora_weights="gaussian",
        target_modules=args.lora_layers,
    )
    model.add_adapter(config)
    if not new_rows:
        return None
    train_class_rows(model, new_rows)
    return class_table(model)[1].class_embedder.weight.detach().clone()


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What the optimizer updates, the EMA averages and gradient clipping sees: every parameter of the model, or
    with --lora_rank the adapter's and the new label rows'."""
    return [p for p in model.parameters() if p.requires_grad]


def make_ema(args, model: torch.nn.Module) -> EMAModel | None:
    """The EMA of the trained parameters with --use_ema (its first update copies the weights)."""
    if not args.use_ema:
        return None
    warmup = dict(use_ema_warmup=True, power=3 / 4) if args.ema_warmup else dict(min_decay=args.ema_decay)
    return EMAModel(
        trainable_parameters(model), decay=args.ema_decay, model_cls=type(model), model_config=model.config, **warmup
    )


def warn_if_ema_stays_near_the_start(args, max_train_steps: int) -> None:
    if args.use_ema and not args.ema_warmup and args.ema_decay**max_train_steps > 0.05:
        # measured on digits-latent: 4000 steps at the default 0.9999 save 67 % initial weights and sample noise
        logger.warning(
            f"--ema_decay {args.ema_decay} without --ema_warmup over {max_train_steps} steps: the saved EMA weights "
            f"will still be {args.ema_decay**max_train_steps:.0%} the initial ones. Pass --ema_warmup or a lower "
            "--ema_decay for a run this short."
        )


def make_optimizer(args, parameters: list[torch.nn.Parameter], total_batch: int) -> torch.optim.Optimizer:
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
        parameters,
        lr=lr,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def compute_loss(batch: dict, seed: int, model, spec: RunSpec, num_classes: int, args, accelerator) -> tuple:
    """(loss, extra logs) of the objective on one micro-batch; every random draw comes from `seed`."""
    generator = torch.Generator(accelerator.device).manual_seed(seed)
    torch.manual_seed(seed)  # randomness inside the model (dropout)
    vae = spec.vae
    if "moments" in batch:  # cached latents
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
    return spec.objective(model, x0, labels, generator)


def train_step(
    batch: dict, seed: int, model, optimizer, lr_scheduler, spec: RunSpec, num_classes: int, args, accelerator
):
    """One micro-batch: loss, backward and, at the end of an accumulation, clipping and the optimizer step."""
    with accelerator.accumulate(model):
        loss, extra = compute_loss(batch, seed, model, spec, num_classes, args, accelerator)
        accelerator.backward(loss)
        if accelerator.sync_gradients and args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(trainable_parameters(model), args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
    return loss, extra


def update_ema(ema: EMAModel, model, offload: bool, device) -> None:
    if offload:
        ema.to(device, non_blocking=True)
    ema.step(trainable_parameters(model))
    if offload:
        ema.to("cpu", non_blocking=True)


def make_pipeline(spec: RunSpec, transformer, id2label: dict | None) -> DiffiTPipeline:
    """The written pipeline around `transformer`: the run's scheduler, VAE, labels and sampling defaults."""
    return DiffiTPipeline(
        transformer=transformer, scheduler=spec.scheduler, vae=spec.vae, id2label=id2label, **spec.recipe
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
    target = args.hub_model_id or args.output_dir
    load = f'DiffiTPipeline.from_pretrained("{target}")'
    lora = ""
    if args.lora_rank:  # an adapter: the base pipeline, then the adapter (with the label rows it trained)
        load = f'DiffiTPipeline.from_pretrained("{base}")\npipe.load_lora_weights("{target}")'
        lora = f"\n- LoRA: rank {args.lora_rank}, alpha {args.lora_alpha or args.lora_rank}, layers {','.join(args.lora_layers)}"
    return f"""# DiffiT ({model_cls.__name__})

[DiffiT](https://arxiv.org/abs/2312.02139) {origin} with `examples/train_diffit.py` of diffusers-diffit.

- data: {data} ({num_items} items, {num_classes or "no"} classes{dropout})
- objective: `{objective.name}` (diffusers_diffit/losses.py)
- {steps} optimizer steps of batch {total_batch}, learning rate {args.learning_rate} ({args.lr_scheduler}),
  {ema if args.use_ema else "no EMA"}, seed {args.seed}{lora}

## Usage

```python
import torch
from diffusers_diffit import DiffiTPipeline

pipe = {load}
images = pipe(class_labels={labels}, generator=torch.manual_seed(0)).images
```

## Citation

```bibtex
{DIFFIT_CITATION}
```
"""


def validate(model, ema: EMAModel | None, spec: RunSpec, id2label: dict | None, step: int, args, accelerator) -> None:
    """Sample a labelled grid (with the EMA weights under --use_ema) with the written pipeline's scheduler; save it
    and send it to the trackers."""
    trained = accelerator.unwrap_model(model)
    if ema is not None:
        ema.store(trainable_parameters(trained))
        ema.copy_to(trainable_parameters(trained))
    pipeline = make_pipeline(spec, trained.eval(), id2label)
    pipeline.set_progress_bar_config(disable=True)
    labels = (args.validation_labels or list(range(min(len(id2label), 8)))) if id2label else []
    images = pipeline(
        class_labels=labels or None,
        num_images_per_label=args.num_validation_images,
        num_inference_steps=args.validation_inference_steps,
        guidance_scale=args.validation_guidance_scale,
        generator=torch.Generator(accelerator.device).manual_seed(args.seed),
        output_type="np",
    ).images
    trained.train()
    if ema is not None:
        ema.restore(trainable_parameters(trained))
    grid = make_image_grid(numpy_to_pil(images), rows=max(len(labels), 1), cols=args.num_validation_images)
    samples = Path(args.output_dir) / "samples"
    samples.mkdir(exist_ok=True)
    grid.save(samples / f"step-{step:07d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", images, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(grid, caption=f"labels {labels}")]}, step=step)


def save_pipeline(model, ema: EMAModel | None, spec: RunSpec, id2label: dict | None, card_text: str, steps: int, args):
    """The result (main process): a pipeline folder with the EMA weights under --use_ema, its model card, and the
    upload with --push_to_hub."""
    output_dir = Path(args.output_dir)
    if args.lora_rank:  # the adapter alone, plus the label rows it trained
        layers = get_peft_model_state_dict(model)
        if spec.initial_class_table is not None:
            layers |= class_rows_state_dict(model, spec.initial_class_table)
        DiffiTPipeline.save_lora_weights(
            output_dir, layers, transformer_lora_adapter_metadata=model.peft_config["default"].to_dict()
        )
    else:
        if ema is not None:
            ema.copy_to(trainable_parameters(model))
        make_pipeline(spec, model.eval(), id2label).save_pretrained(output_dir)
    card = create_model_card(
        output_dir,
        card_text,
        license=args.license or spec.license,
        base_model=spec.base_model,
        tags=[
            "diffit",
            "diffusers-diffit",
            "image-generation",
            "class-conditional" if id2label else "unconditional-image-generation",
            *(["lora"] if args.lora_rank else []),
        ],
    )
    card.save(output_dir / "README.md")
    logger.info(f"Saved the pipeline to {output_dir}")
    if args.push_to_hub:
        plan = push_to_hub(
            output_dir,
            args.hub_model_id or output_dir.resolve().name,
            private=args.hub_private_repo,
            commit_message=f"DiffiT trained for {steps} steps with train_diffit.py",
            ignore_patterns=["checkpoint-*", ".tmp-*", ".trash-*", f"{args.logging_dir}/*"],
        )
        logger.info(f"Pushed {len(plan.files)} files: {plan.commit_url}")


def resume(args, accelerator, checkpoints: CheckpointManager) -> int:
    """Load the checkpoint --resume_from_checkpoint names (if there is one yet); the step to continue from."""
    if not args.resume_from_checkpoint:
        return 0
    path = checkpoints.resolve(args.resume_from_checkpoint)
    if path is None:
        logger.info("No complete checkpoint yet; starting a new run.")
        return 0
    accelerator.load_state(str(path))
    logger.info(f"Resumed from {path} at step {CheckpointManager.step_of(path)}")
    return CheckpointManager.step_of(path)


def main(argv=None) -> int:
    """Train and write the pipeline; returns the exit status: 0, or `PREEMPTED_EXIT_STATUS` when a SIGTERM stopped
    the run at a checkpoint."""
    args = parse_args(argv)
    accelerator = make_accelerator(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)  # the model's initialisation
    spec = load_run_spec(args)
    dataset = build_dataset(args, spec)
    num_classes, id2label = check_inputs(args, accelerator, spec, dataset)
    model = build_model(args, spec, dataset.classes, num_classes)
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:  # every check has passed: the first thing written
        output_dir.mkdir(parents=True, exist_ok=True)
    ema = make_ema(args, model)

    # ---- optimisation
    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    optimizer = make_optimizer(args, trainable_parameters(model), total_batch)
    train_dataloader = DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.dataloader_num_workers,
    )
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    warn_if_ema_stays_near_the_start(args, max_train_steps)
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
    if spec.vae is not None:  # fp32 weights (saved with the pipeline), encoding under autocast
        spec.vae.to(accelerator.device)

    # ---- checkpoints and resuming
    register_diffusers_hooks(accelerator, ema, ema_device)
    checkpoints = CheckpointManager(output_dir, accelerator, args.checkpoints_total_limit)
    checkpoints.remove_partial()
    global_step = resume(args, accelerator, checkpoints)
    if accelerator.is_main_process:
        tracked = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
        accelerator.init_trackers(args.tracker_project_name, config=tracked)
    logger.info(
        f"{len(dataset)} items, {num_classes or 'no'} classes, {max_train_steps} steps of {total_batch} "
        f"(batch {args.train_batch_size} × {accelerator.num_processes} processes × "
        f"{args.gradient_accumulation_steps} accumulation), objective {spec.objective.name}, "
        f"{'latent' if spec.vae is not None else 'pixel'} space"
    )

    # ---- the loop: a step's randomness comes from (seed, step, micro-batch, process), the data from (seed, epoch)
    first_epoch, skip_batches = divmod(global_step, steps_per_epoch)
    progress = tqdm(
        range(max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    micro_step, timed_steps, clock, preempted = 0, 0, None, False
    with SigtermFlag(accelerator) as sigterm:
        for epoch in range(first_epoch, num_epochs):
            if global_step >= max_train_steps or preempted:
                break
            train_dataloader.set_epoch(epoch)  # the sampler's shuffle and the dataset's augmentation
            loader = train_dataloader
            if epoch == first_epoch and skip_batches:  # resumed inside an epoch
                loader = skip_first_batches(train_dataloader, skip_batches * args.gradient_accumulation_steps)
            for batch in loader:
                seed = derive_seed(args.seed, global_step, micro_step, accelerator.process_index)
                loss, extra = train_step(
                    batch, seed, model, optimizer, lr_scheduler, spec, num_classes, args, accelerator
                )
                micro_step += 1
                if not accelerator.sync_gradients:
                    continue
                micro_step = 0
                if ema is not None:
                    update_ema(ema, model, args.offload_ema, accelerator.device)
                global_step += 1
                progress.update(1)
                if clock is None:
                    clock = time.perf_counter()  # throughput is timed from the end of the first step
                else:
                    timed_steps += 1
                logs = {"loss": accelerator.gather(loss.detach()).mean().item(), "lr": lr_scheduler.get_last_lr()[0]}
                logs |= extra | ({"ema_decay": ema.cur_decay_value} if ema is not None else {})
                progress.set_postfix(loss=f"{logs['loss']:.4f}")
                accelerator.log(logs, step=global_step)
                preempted = sigterm.received_anywhere()
                if global_step % args.checkpointing_steps == 0 or preempted:
                    checkpoints.save(global_step)
                if preempted:
                    break
                if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                    validate(model, ema, spec, id2label, global_step, args, accelerator)
                if global_step >= max_train_steps:
                    break
    progress.close()
    if timed_steps:
        logger.info(f"Throughput: {timed_steps / (time.perf_counter() - clock):.3f} steps/s over {timed_steps} steps")
    if preempted:
        logger.warning(
            f"Stopped by SIGTERM at step {global_step}, after saving its checkpoint; continue the run with "
            "--resume_from_checkpoint latest."
        )
        accelerator.end_training()
        return PREEMPTED_EXIT_STATUS

    # ---- the result: a pipeline folder (EMA weights with --use_ema)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        card_text = model_card_text(
            args, spec.model_cls, spec.objective, len(dataset), num_classes, max_train_steps, total_batch
        )
        save_pipeline(accelerator.unwrap_model(model), ema, spec, id2label, card_text, max_train_steps, args)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as error:  # a bad argument or input, found before training: one line, exit status 2
        print(f"train_diffit.py: error: {error}", file=sys.stderr)
        sys.exit(2)
