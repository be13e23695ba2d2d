#!/usr/bin/env python
"""Train or fine-tune DiffiT with 🤗 accelerate, from one CPU to many GPUs and nodes (examples/README.md).

- Latent DiffiT (`DiffiTTransformer2DModel` + a VAE, or latents cached by precompute_latents.py): ε-MSE plus the
  variational-bound term for the learned variance (ADM / DiT hybrid loss), DDPM noising with linear betas.
- Image-space DiffiT (`DiffiTUNet2DModel`): the EDM loss and preconditioning.

Label dropout for classifier-free guidance happens inside the model (`class_dropout_prob`). All randomness of a
step (timesteps, noise, VAE posterior samples, label dropout, dropout) is drawn from seeds that depend only on
(--seed, optimizer step, micro-batch, process), and the data order and augmentation only on (--seed, epoch), so a
run resumed with `--resume_from_checkpoint latest` ends with the weights of an uninterrupted one.

The output is a pipeline folder that `DiffiTPipeline.from_pretrained(output_dir)` loads (EMA weights with
--use_ema), with a model card; `checkpoint-<step>` folders sit next to it.
"""

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.data_loader import skip_first_batches
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDPMScheduler
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
    DiffiTTransformer2DModel,
    DiffiTUNet2DModel,
    EDMHeunScheduler,
)
from diffusers_diffit.edm import edm_loss
from diffusers_diffit.hub import DIFFIT_CITATION, create_model_card, download_pipeline, push_to_hub
from diffusers_diffit.pipelines import DiffiTPipeline, official_scheduler
from diffusers_diffit.training import (
    CheckpointManager,
    EpochSampler,
    HybridDiffusionLoss,
    ImageDataset,
    LatentDataset,
    default_class_map,
    derive_seed,
    load_vae,
    resize_class_embedding,
    set_class_dropout_prob,
)


logger = get_logger(__name__)
RECIPE_KEYS = ("num_inference_steps", "guidance_scale", "guidance_schedule", "guidance_power", "guided_channels",
               "guidance_interval")
MODEL_CLASSES = {cls.__name__: cls for cls in (DiffiTTransformer2DModel, DiffiTUNet2DModel)}
NAMED_CONFIGS = {**{k: ("DiffiTTransformer2DModel", v) for k, v in DIFFIT_CONFIGS.items()},
                 **{k: ("DiffiTUNet2DModel", v) for k, v in DIFFIT_UNET_CONFIGS.items()}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", help="A DiffiT pipeline folder or Hub id to fine-tune.")
    model.add_argument(
        "--model_config_name_or_path",
        help=f"Train from scratch: a config.json, a model folder, or one of {sorted(NAMED_CONFIGS)}.",
    )
    model.add_argument("--vae", help="AutoencoderKL folder / Hub id (or a pipeline with a `vae`) for latent training "
                       "from scratch; default: the pretrained pipeline's VAE, or the one --latents_dir was made with.")
    model.add_argument("--num_classes", type=int, help="Classes of the trained model (0 = unconditional); "
                       "default: the dataset's class count. Fine-tuning re-shapes the label table (see README).")
    model.add_argument("--class_dropout_prob", type=float, help="Label dropout for CFG; default: the model's.")
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
    train.add_argument("--learning_rate", type=float, default=1e-4)
    train.add_argument("--scale_lr", action="store_true", help="Multiply the lr by batch · accumulation · processes.")
    train.add_argument("--lr_scheduler", default="constant",
                       help='"linear", "cosine", "cosine_with_restarts", "polynomial", "constant", '
                            '"constant_with_warmup"')
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
    train.add_argument("--ema_decay", type=float, default=0.9999, help="Constant EMA decay (the paper's 0.9999).")
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
        p.error("pass exactly one of --pretrained_model_name_or_path (fine-tune) / "
                "--model_config_name_or_path (from scratch)")
    if sum(x is not None for x in (args.train_data_dir, args.dataset_name, args.latents_dir)) != 1:
        p.error("pass exactly one of --train_data_dir / --dataset_name / --latents_dir")
    for name in ("train_batch_size", "gradient_accumulation_steps", "num_epochs", "checkpointing_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.num_classes is not None and args.num_classes < 0:
        p.error(f"--num_classes must be >= 0 (0 = unconditional), got {args.num_classes}")
    if args.class_dropout_prob is not None and not 0 <= args.class_dropout_prob < 1:
        p.error(f"--class_dropout_prob must be in [0, 1), got {args.class_dropout_prob}")
    if not 0 <= args.ema_decay < 1:
        p.error(f"--ema_decay must be in [0, 1), got {args.ema_decay}")
    if args.latents_dir and args.center_crop:
        p.error("--center_crop does not apply to --latents_dir (latents were cropped when they were encoded)")
    return args


def scratch_config(args) -> tuple[type, dict]:
    """--model_config_name_or_path -> (model class, config without diffusers' private keys)."""
    name = args.model_config_name_or_path
    if name in NAMED_CONFIGS:
        class_name, config = NAMED_CONFIGS[name]
    else:
        path = Path(name)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ValueError(f"`--model_config_name_or_path` {name!r} is not a config file, a model folder, or one of "
                             f"{sorted(NAMED_CONFIGS)}.")
        config = json.loads(path.read_text())
        class_name = config.get("_class_name")
        if class_name not in MODEL_CLASSES:
            raise ValueError(f"{path} has `_class_name` {class_name!r}; allowed: {sorted(MODEL_CLASSES)}.")
    return MODEL_CLASSES[class_name], {k: v for k, v in config.items() if not k.startswith("_")}


def default_recipe(model_cls: type, config: dict) -> tuple:
    """(scheduler, sampling defaults) a new pipeline ships with: EDM Heun with 18 steps for the U-Net (the paper's
    CIFAR-10 setting); for the transformer SPEC.md §3's DDPM (learned-range variance when the model predicts it)
    with the release's 250 steps, no guidance."""
    if model_cls is DiffiTUNet2DModel:
        return EDMHeunScheduler(), {"num_inference_steps": 18}
    scheduler = official_scheduler()
    if config.get("out_channels") != 2 * config["in_channels"]:
        scheduler = DDPMScheduler.from_config(scheduler.config, variance_type="fixed_small")
    return scheduler, {"num_inference_steps": 250}


def model_card_text(args, model_cls, num_items, num_classes, steps, total_batch) -> str:
    base = args.pretrained_model_name_or_path
    if base is None:
        origin = "trained from scratch"
    elif Path(base).is_dir():
        origin = f"fine-tuned from the pipeline in `{base}`"
    else:
        origin = f"fine-tuned from [{base}](https://huggingface.co/{base})"
    data = args.train_data_dir or args.dataset_name or f"latents in {args.latents_dir}"
    objective = ("the EDM loss and preconditioning" if model_cls is DiffiTUNet2DModel
                 else "ε-MSE + the variational-bound term for the learned variance (ADM / DiT hybrid loss)")
    labels = "[0, 1]" if num_classes else "None"
    return f"""# DiffiT ({model_cls.__name__})

[DiffiT](https://arxiv.org/abs/2312.02139) {origin} with `examples/train_diffit.py` of diffusers-diffit.

- data: {data} ({num_items} items, {num_classes or 'no'} classes)
- objective: {objective}
- {steps} optimizer steps of batch {total_batch}, learning rate {args.learning_rate} ({args.lr_scheduler}),
  {"EMA " + str(args.ema_decay) + " (these are the EMA weights)" if args.use_ema else "no EMA"}, seed {args.seed}

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
        return LatentDataset(args.latents_dir, random_flip=args.random_flip)
    kwargs = dict(channels=channels, center_crop=args.center_crop, random_flip=args.random_flip)
    if args.train_data_dir:
        return ImageDataset.from_folder(args.train_data_dir, resolution, **kwargs)
    return ImageDataset.from_hub(
        args.dataset_name, resolution, image_column=args.image_column, label_column=args.label_column,
        config_name=args.dataset_config_name, cache_dir=args.cache_dir, **kwargs,
    )


def main(argv=None):
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir),
                                            logging_dir=str(output_dir / args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:  # e.g. torchrun on a machine without GPUs and without --cpu
        raise ValueError(f"{launched} processes were launched but accelerate runs {accelerator.num_processes}; on CPUs "
                         "launch with ACCELERATE_USE_CPU=1 (see examples/README.md).")
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(args.seed)  # the model's initialisation
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    # ---- model, VAE, data
    pipe, pretrained_id2label, base_license, base_model = None, None, "other", None
    if args.pretrained_model_name_or_path:
        base_folder = download_pipeline(args.pretrained_model_name_or_path)
        if not Path(args.pretrained_model_name_or_path).is_dir():  # the card's `base_model` names Hub repos only
            base_model = args.pretrained_model_name_or_path
        if (Path(base_folder) / "README.md").is_file():  # fine-tuned weights keep the base model's licence
            base_license = ModelCard.load(Path(base_folder) / "README.md").data.license or base_license
        pipe = DiffiTPipeline.from_pretrained(base_folder)
        model_cls, config = type(pipe.transformer), dict(pipe.transformer.config)
        sampling_scheduler, pretrained_id2label = pipe.scheduler, pipe.id2label
        recipe = {k: pipe.config[k] for k in RECIPE_KEYS}
        vae = load_vae(args.vae) if args.vae else pipe.vae
    else:
        model_cls, config = scratch_config(args)
        sampling_scheduler, recipe = default_recipe(model_cls, config)
        vae = load_vae(args.vae) if args.vae else None
    if vae is None and args.latents_dir:
        vae = load_vae(json.loads((Path(args.latents_dir) / "metadata.json").read_text())["vae"])
    is_edm = model_cls is DiffiTUNet2DModel
    if vae is not None:
        if vae.config.latent_channels != config["in_channels"]:
            raise ValueError(f"The VAE has {vae.config.latent_channels} latent channels but the model takes "
                             f"{config['in_channels']}.")
        vae.requires_grad_(False).eval()
        resolution = config["sample_size"] * 2 ** (len(vae.config.block_out_channels) - 1)
        channels = vae.config.in_channels
    else:
        resolution, channels = config["sample_size"], config["in_channels"]
    if args.resolution is not None and args.resolution != resolution:
        raise ValueError(f"`--resolution` {args.resolution} does not match the model: it trains at {resolution} px "
                         f"(sample_size {config['sample_size']}{' × the VAE factor' if vae else ''}).")
    dataset = build_dataset(args, resolution, channels)
    if args.latents_dir and (dataset.metadata["resolution"] != resolution
                             or dataset.metadata["scaling_factor"] != vae.config.scaling_factor):
        raise ValueError(f"--latents_dir {args.latents_dir} was encoded at {dataset.metadata['resolution']} px with "
                         f"scaling factor {dataset.metadata['scaling_factor']}; this run needs {resolution} px and "
                         f"{vae.config.scaling_factor}.")

    classes = dataset.classes
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
    if pipe is not None:
        model = pipe.transformer
        class_map = default_class_map(classes, pretrained_id2label, config["num_classes"], num_classes)
        if num_classes != config["num_classes"] or class_map != list(range(num_classes)):
            kept = sum(j is not None for j in class_map)
            logger.info(f"Label table: {config['num_classes']} -> {num_classes} classes, {kept} kept, "
                        f"{num_classes - kept} new (they start from the null row)")
            resize_class_embedding(model, num_classes, class_map)
        if args.class_dropout_prob is not None:
            set_class_dropout_prob(model, args.class_dropout_prob)
        del pipe
    else:
        overrides = {"num_classes": num_classes}
        if args.class_dropout_prob is not None:
            overrides["class_dropout_prob"] = args.class_dropout_prob
        model = model_cls.from_config({**config, **overrides})
    id2label = {i: classes[i] if i < len(classes) else str(i) for i in range(num_classes)} if num_classes else None

    def make_pipeline(transformer) -> DiffiTPipeline:
        return DiffiTPipeline(transformer=transformer, scheduler=sampling_scheduler, vae=vae, id2label=id2label,
                              **recipe)

    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    ema = None
    if args.use_ema:  # constant decay from the second update on (min_decay = decay); the first copies the weights
        ema = EMAModel(model.parameters(), decay=args.ema_decay, min_decay=args.ema_decay, model_cls=type(model),
                       model_config=model.config)

    # ---- optimisation
    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    lr = args.learning_rate * total_batch if args.scale_lr else args.learning_rate
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from e
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    optimizer = optimizer_cls(model.parameters(), lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                              weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    sampler = EpochSampler(len(dataset), args.seed)
    train_dataloader = DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler, drop_last=True,
                                  num_workers=args.dataloader_num_workers)
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    if len(train_dataloader) == 0:
        raise ValueError(f"The dataset ({len(dataset)} items) has less than one batch per process "
                         f"({args.train_batch_size} × {accelerator.num_processes}).")
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    lr_scheduler = accelerator.prepare(lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device if not args.offload_ema else "cpu")
    if vae is not None:  # fp32 weights (saved with the pipeline), encoding under autocast
        vae.to(accelerator.device)
    noise_scheduler = None if is_edm else DDPMScheduler.from_config(sampling_scheduler.config)
    hybrid_loss = None if is_edm else HybridDiffusionLoss(noise_scheduler)

    # ---- checkpoints: the model and EMA as diffusers folders (hooks), the rest by accelerate
    def save_model_hook(models, weights, checkpoint_dir):
        if accelerator.is_main_process:
            accelerator.unwrap_model(models[0]).save_pretrained(os.path.join(checkpoint_dir, "model"))
            if ema is not None:
                ema.save_pretrained(os.path.join(checkpoint_dir, "model_ema"))
        weights.clear()

    def load_model_hook(models, checkpoint_dir):
        target = accelerator.unwrap_model(models.pop())
        loaded = type(target).from_pretrained(checkpoint_dir, subfolder="model")
        target.load_state_dict(loaded.state_dict())
        if ema is not None:
            loaded_ema = EMAModel.from_pretrained(os.path.join(checkpoint_dir, "model_ema"), type(target))
            ema.load_state_dict(loaded_ema.state_dict())
            ema.to(accelerator.device if not args.offload_ema else "cpu")

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
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
        config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
        accelerator.init_trackers(args.tracker_project_name, config=config)
    logger.info(f"{len(dataset)} items, {num_classes or 'no'} classes, {max_train_steps} steps of {total_batch} "
                f"(batch {args.train_batch_size} × {accelerator.num_processes} processes × "
                f"{args.gradient_accumulation_steps} accumulation), {'EDM' if is_edm else 'DDPM hybrid'} loss, "
                f"{'latent' if vae is not None else 'pixel'} space")

    def compute_loss(batch, seed: int) -> tuple[torch.Tensor, dict]:
        generator = torch.Generator(accelerator.device).manual_seed(seed)
        torch.manual_seed(seed)  # randomness inside the model: label dropout, dropout
        labels = batch["class_labels"] if num_classes else None
        if "moments" in batch:
            x0 = DiagonalGaussianDistribution(batch["moments"]).sample(generator) * vae.config.scaling_factor
        elif vae is not None:
            with torch.no_grad(), accelerator.autocast():
                moments = vae.encode(batch["pixel_values"]).latent_dist.parameters.float()
            x0 = DiagonalGaussianDistribution(moments).sample(generator) * vae.config.scaling_factor
        else:
            x0 = batch["pixel_values"]
        if is_edm:
            loss = edm_loss(model, x0, labels, generator=generator)
            return loss, {}
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (x0.shape[0],),
                                  generator=generator, device=x0.device)
        x_t = noise_scheduler.add_noise(x0, noise, timesteps)
        output = model(x_t, timesteps, class_labels=labels).sample
        terms = hybrid_loss(output, x0, x_t, noise, timesteps)
        return terms["loss"].mean(), {"mse": terms["mse"].mean().item(), "vlb": terms["vlb"].mean().item()}

    def validate(step: int):
        pipe_model = accelerator.unwrap_model(model)
        if ema is not None:
            ema.store(pipe_model.parameters())
            ema.copy_to(pipe_model.parameters())
        pipe_model.eval()
        pipeline = make_pipeline(pipe_model)
        pipeline.set_progress_bar_config(disable=True)
        labels = (args.validation_labels or list(range(min(num_classes, 8)))) if num_classes else []
        rows = max(len(labels), 1)
        images = pipeline(
            class_labels=labels or None, num_images_per_label=args.num_validation_images,
            num_inference_steps=args.validation_inference_steps, guidance_scale=args.validation_guidance_scale,
            generator=torch.Generator(accelerator.device).manual_seed(args.seed), output_type="np",
        ).images
        pipe_model.train()
        if ema is not None:
            ema.restore(pipe_model.parameters())
        grid = make_image_grid(numpy_to_pil(images), rows=rows, cols=args.num_validation_images)
        (output_dir / "samples").mkdir(exist_ok=True)
        grid.save(output_dir / "samples" / f"step-{step:07d}.png")
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images("validation", images, step, dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": [wandb.Image(grid, caption=f"labels {labels}")]}, step=step)

    # ---- the loop
    first_epoch, skip_batches = divmod(global_step, steps_per_epoch)
    skip_batches *= args.gradient_accumulation_steps
    progress = tqdm(range(max_train_steps), initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    micro_step, timed_steps, start = 0, 0, None
    for epoch in range(first_epoch, num_epochs):
        if global_step >= max_train_steps:
            break
        train_dataloader.set_epoch(epoch)  # accelerate passes it on to the sampler at every `iter` (also when skipping)
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
            if start is None:
                start = time.perf_counter()  # throughput is timed from the end of the first step
            else:
                timed_steps += 1
            logs = {"loss": accelerator.gather(loss.detach()).mean().item(), "lr": lr_scheduler.get_last_lr()[0],
                    **extra}
            if ema is not None:
                logs["ema_decay"] = ema.cur_decay_value
            progress.set_postfix(loss=f"{logs['loss']:.4f}")
            accelerator.log(logs, step=global_step)
            if global_step % args.checkpointing_steps == 0:
                checkpoints.save(global_step)
            if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                validate(global_step)
            if global_step >= max_train_steps:
                break
    progress.close()
    if timed_steps:
        logger.info(f"Throughput: {timed_steps / (time.perf_counter() - start):.3f} steps/s over {timed_steps} steps")

    # ---- the result: a pipeline folder (EMA weights when --use_ema)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        if ema is not None:
            ema.copy_to(final.parameters())
        final.eval()
        make_pipeline(final).save_pretrained(output_dir)
        card = create_model_card(
            output_dir, model_card_text(args, model_cls, len(dataset), num_classes, max_train_steps, total_batch),
            license=args.license or base_license,
            base_model=base_model,
            tags=["diffit", "diffusers-diffit", "image-generation",
                  "class-conditional" if num_classes else "unconditional-image-generation"],
        )
        card.save(output_dir / "README.md")
        logger.info(f"Saved the pipeline to {output_dir}")
        if args.push_to_hub:
            plan = push_to_hub(
                output_dir, args.hub_model_id or output_dir.resolve().name, private=args.hub_private_repo,
                commit_message=f"DiffiT trained for {max_train_steps} steps with train_diffit.py",
                ignore_patterns=["checkpoint-*", ".tmp-*", ".trash-*", f"{args.logging_dir}/*"],
            )
            logger.info(f"Pushed {len(plan.files)} files: {plan.commit_url}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
