"""The library side of DiffiT training (used by `examples/train_diffit.py` and `examples/precompute_latents.py`).

- `derive_seed`: per-step randomness as a pure function of (seed, step, ...), so a resumed run draws what an
  uninterrupted one would.
- `HybridDiffusionLoss`: ADM's / DiT's L_simple + L_vlb for ε-prediction with a learned-range variance.
- `resize_class_embedding`: the label-table rule for fine-tuning with other classes (or none).
- `CheckpointManager`: crash-safe `checkpoint-<step>` folders around `accelerator.save_state`.
- `EpochSampler`, `ImageDataset`, `LatentDataset`: seeded data order and augmentation, images or cached VAE moments.
"""

import json
import logging
import math
import os
import random
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler
from PIL import Image
from safetensors import safe_open
from torch import nn
from torch.utils.data import Dataset, Sampler

from .labels import normalize_id2label
from .models.embeddings import DiffiTConditioningEmbedding


logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that depends only on the non-negative integer `keys`, e.g. (seed, global_step, micro_step,
    process_index). Independent streams for neighbouring keys (numpy's `SeedSequence` hashing)."""
    if any(k < 0 for k in keys):
        raise ValueError(f"`keys` must be non-negative integers, got {keys}.")
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


# ----------------------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------------------


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) elementwise for data on [-1, 1] quantised to 256 levels (bins of width 2/255), under
    N(mean, e^(2·log_scale)); the outermost bins take the tails (DDPM's decoder, Ho et al. §3.3); probabilities
    are floored at 1e-12 (ADM).

    Computed from log-CDFs on the lower tail (a bin's mass equals its mirror image's), so float32 stays accurate
    many standard deviations from the mean, where differences of CDFs cancel to 0. ADM uses a tanh approximation
    of the CDF; this is the exact one."""
    inv_std = torch.exp(-log_scale)
    half_bin = 1.0 / 255
    near = -(x - mean).abs()
    log_upper = torch.special.log_ndtr(inv_std * (near + half_bin))
    log_lower = torch.special.log_ndtr(inv_std * (near - half_bin))
    log_delta = log_upper + torch.log1p(-torch.exp(log_lower - log_upper))
    log_lowest = torch.special.log_ndtr(inv_std * (x - mean + half_bin))  # P(X < x + h), the bin of x = -1
    log_highest = torch.special.log_ndtr(-inv_std * (x - mean - half_bin))  # P(X > x − h), the bin of x = +1
    log_probs = torch.where(x < -0.999, log_lowest, torch.where(x > 0.999, log_highest, log_delta))
    return log_probs.clamp(min=math.log(1e-12))


class HybridDiffusionLoss:
    """L_hybrid = L_simple + λ·L_vlb (Nichol & Dhariwal 2021, "improved DDPM"; ADM and DiT train with it, and so did
    DiffiT), for a model whose output is [ε̂ ‖ v] with the learned-range variance of SPEC.md §3.

    - L_simple = mean over dims of (ε − ε̂)².
    - L_vlb, in bits per dimension: KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)) for t > 0, and the discretized
      Gaussian decoder NLL −log p_θ(x_0 | x_1) for t = 0.
    - p_θ's mean is the posterior mean at x̂_0 = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t with ε̂ **detached**, so L_vlb only
      trains v.
    - p_θ's variance: log σ² = f·log β_t + (1 − f)·log β̃_t, f = (v + 1)/2, where log β̃ is ADM's clipped
      table (β̃_0 = 0 replaced by β̃_1).
    - λ = num_train_timesteps / 1000 (ADM's weighting; 1 for the usual 1000 steps).

    A model without variance channels (out_channels == in_channels) gets L_simple only.
    Timestep conventions are diffusers' `DDPMScheduler`'s (t = 0 is the first noising step, ᾱ_{−1} = 1).
    """

    def __init__(self, scheduler: DDPMScheduler):
        betas = scheduler.betas.double()
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.num_train_timesteps = len(betas)
        self.vlb_weight = self.num_train_timesteps / 1000.0
        # computed in float64, stored in float32 (ADM gathers from float64 and casts: the same numbers)
        self.sqrt_recip_alphas_cumprod = torch.rsqrt(alphas_cumprod).float()
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1.0 / alphas_cumprod - 1.0).float()
        self.posterior_mean_coef1 = (betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod)).float()
        self.posterior_mean_coef2 = ((1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod)).float()
        self.posterior_log_variance = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])).float()
        self.log_betas = torch.log(betas).float()

    def _gather(self, table: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:  # -> [B, 1, 1, 1]
        return table.to(timesteps.device)[timesteps].view(-1, 1, 1, 1)

    def posterior_mean(self, x_start: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Mean of q(x_{t−1} | x_t, x_0)."""
        return self._gather(self.posterior_mean_coef1, timesteps) * x_start + self._gather(
            self.posterior_mean_coef2, timesteps
        ) * x_t

    def model_log_variance(self, v: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        frac = (v + 1) / 2
        return frac * self._gather(self.log_betas, timesteps) + (1 - frac) * self._gather(
            self.posterior_log_variance, timesteps
        )

    def vlb(
        self, eps: torch.Tensor, v: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """L_vlb per sample [B] in bits/dim (unweighted) for predicted ε (used as given) and variance channels v."""
        pred_x_start = self._gather(self.sqrt_recip_alphas_cumprod, timesteps) * x_t - self._gather(
            self.sqrt_recipm1_alphas_cumprod, timesteps
        ) * eps
        model_mean = self.posterior_mean(pred_x_start, x_t, timesteps)
        model_log_variance = self.model_log_variance(v, timesteps)
        true_mean = self.posterior_mean(x_start, x_t, timesteps)
        true_log_variance = self._gather(self.posterior_log_variance, timesteps)
        kl = normal_kl(true_mean, true_log_variance, model_mean, model_log_variance).mean(dim=(1, 2, 3))
        nll = -discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_variance).mean(dim=(1, 2, 3))
        return torch.where(timesteps == 0, nll, kl) / math.log(2.0)

    def __call__(
        self,
        model_output: torch.Tensor,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            model_output: [B, C or 2C, H, W]: ε̂, then v when the model learns the variance.
            x_start, x_t, noise: [B, C, H, W] with x_t = √ᾱ_t·x_start + √(1−ᾱ_t)·noise.
            timesteps: int64 [B] in [0, num_train_timesteps).
        Returns:
            per-sample [B] float32 tensors: "loss" = "mse" + λ·"vlb" ("vlb" is 0 without variance channels).
        """
        channels = x_start.shape[1]
        if model_output.shape[1] not in (channels, 2 * channels):
            raise ValueError(
                f"`model_output` must have {channels} (ε) or {2 * channels} (ε and v) channels, "
                f"got {model_output.shape[1]}."
            )
        model_output, x_start, x_t, noise = (t.float() for t in (model_output, x_start, x_t, noise))
        eps, v = model_output[:, :channels], model_output[:, channels:]
        mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
        vlb = self.vlb(eps.detach(), v, x_start, x_t, timesteps) if v.shape[1] else torch.zeros_like(mse)
        return {"loss": mse + self.vlb_weight * vlb, "mse": mse, "vlb": vlb}


# ----------------------------------------------------------------------------------------------------------------
# Label table for fine-tuning
# ----------------------------------------------------------------------------------------------------------------


def default_class_map(
    class_names: Sequence[str] | None, pretrained_id2label: dict | None, pretrained_num_classes: int, num_classes: int
) -> list[int | None]:
    """Which pretrained class each new class starts from (None = a new class).

    By name when the pretrained model has `id2label` and the dataset has class names: new class i keeps the row of
    the pretrained class that has name i as one of its names or as its full description (case-insensitive, the
    pipeline's label rules); a name shared by several pretrained classes, or by none, makes a new class.
    Otherwise by id: new class i keeps pretrained row i when i < pretrained_num_classes.
    """
    if class_names is not None and pretrained_id2label:
        index: dict[str, set[int]] = {}
        for class_id, names in normalize_id2label(pretrained_id2label).items():
            for name in (*names, ", ".join(names)):
                index.setdefault(name.lower(), set()).add(class_id)
        matches = [index.get(str(name).strip().lower(), set()) for name in class_names]
        return [next(iter(ids)) if len(ids) == 1 else None for ids in matches]
    return [i if i < pretrained_num_classes else None for i in range(num_classes)]


def _conditioning_embedding(model: nn.Module) -> DiffiTConditioningEmbedding:
    found = [m for m in model.modules() if isinstance(m, DiffiTConditioningEmbedding)]
    if len(found) != 1:
        raise ValueError(f"`model` must hold exactly one DiffiTConditioningEmbedding, found {len(found)}.")
    return found[0]


def set_class_dropout_prob(model: nn.Module, class_dropout_prob: float) -> None:
    """Change the label-dropout probability of a DiffiT model (its config and its conditioning embedding)."""
    if not 0 <= class_dropout_prob < 1:
        raise ValueError(f"`class_dropout_prob` must be in [0, 1), got {class_dropout_prob}.")
    _conditioning_embedding(model).class_dropout_prob = class_dropout_prob
    model.register_to_config(class_dropout_prob=class_dropout_prob)


@torch.no_grad()
def resize_class_embedding(model: nn.Module, num_classes: int, class_map: Sequence[int | None] | None = None) -> None:
    """Re-shape a DiffiT model's label table in place for `num_classes` classes (0 = unconditional).

    The rule (the null class is always the last row, id = num_classes):
    - the pretrained null row moves to the new index `num_classes`;
    - new class i takes pretrained row `class_map[i]` (kept classes), or a copy of the pretrained null row when
      `class_map[i]` is None: a new class starts out as the unconditional model, so its samples begin as
      unconditional ones and classifier-free guidance starts neutral (ε_c = ε_u) rather than pointing somewhere
      arbitrary. `class_map=None` keeps classes by id (row i for i < the pretrained count);
    - from an unconditional model (no table) every row starts at 0, which is again the unconditional model;
    - to an unconditional model (`num_classes=0`) the table is dropped and the null row is folded into the bias of
      the timestep embedder's last layer, so the network computes exactly its pretrained unconditional function.
    Updates `model.config.num_classes`.
    """
    if num_classes < 0:
        raise ValueError(f"`num_classes` must be >= 0 (0 = unconditional), got {num_classes}.")
    embed = _conditioning_embedding(model)
    old_num, table = embed.num_classes, embed.class_embedder
    if class_map is None:
        class_map = [i if i < old_num else None for i in range(num_classes)]
    if len(class_map) != num_classes:
        raise ValueError(f"`class_map` must have one entry per new class ({num_classes}), got {len(class_map)}.")
    bad = [j for j in class_map if j is not None and not 0 <= j < old_num]
    if bad:
        raise ValueError(f"`class_map` entries must be None or pretrained ids in [0, {old_num}), got {bad}.")

    if num_classes == 0:
        if table is not None:
            embed.timestep_embedder.linear_2.bias += table.weight[old_num]
        embed.class_embedder = None
    else:
        dim = embed.timestep_embedder.linear_2.out_features
        ref = embed.timestep_embedder.linear_2.weight
        null = table.weight[old_num] if table is not None else ref.new_zeros(dim)
        rows = [table.weight[j] if j is not None else null for j in class_map] + [null]
        embed.class_embedder = nn.Embedding(num_classes + 1, dim, device=ref.device, dtype=ref.dtype)
        embed.class_embedder.weight.copy_(torch.stack(rows))
    embed.num_classes = num_classes
    model.register_to_config(num_classes=num_classes)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Flush every file and folder under `path` to disk (page-cache data would survive a kill, not a power cut)."""
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    for directory in [path, *(p for p in path.rglob("*") if p.is_dir())]:
        _fsync_dir(directory)


class CheckpointManager:
    """`checkpoint-<step>` folders in `output_dir`, written so that a crash at any moment leaves only complete ones.

    `save(step)` runs `accelerator.save_state` into `.tmp-checkpoint-<step>` (every process writes its own RNG
    file there; `output_dir` must be on a filesystem all processes share), flushes it to disk, writes the
    `checkpoint_complete.json` marker, and only then renames the folder to `checkpoint-<step>` (atomic on POSIX).
    `latest()` considers only folders with the marker. Old checkpoints beyond `total_limit` are removed after the new
    one is complete (renamed to `.trash-*` first, so a half-deleted folder is never picked). Leftover `.tmp-*` /
    `.trash-*` folders of a killed run are removed by `remove_partial()`.
    """

    MARKER = "checkpoint_complete.json"
    _NAME = re.compile(r"^checkpoint-(\d+)$")

    def __init__(self, output_dir: str | os.PathLike, accelerator, total_limit: int | None = None):
        if total_limit is not None and total_limit < 1:
            raise ValueError(f"`total_limit` must be None or >= 1, got {total_limit}.")
        self.output_dir = Path(output_dir)
        self.accelerator = accelerator
        self.total_limit = total_limit

    def complete(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as (step, path), oldest first."""
        if not self.output_dir.is_dir():
            return []
        found = []
        for path in self.output_dir.iterdir():
            match = self._NAME.match(path.name)
            if match and (path / self.MARKER).is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1][1] if found else None

    def resolve(self, resume_from_checkpoint: str) -> Path | None:
        """"latest" -> the newest complete checkpoint (None when there is none yet); a path -> that checkpoint,
        which must be complete."""
        if resume_from_checkpoint == "latest":
            return self.latest()
        path = Path(resume_from_checkpoint)
        if not (path / self.MARKER).is_file():
            raise ValueError(
                f"`resume_from_checkpoint` {resume_from_checkpoint!r} is not a complete checkpoint folder "
                f"(no {self.MARKER}); pass 'latest' or a checkpoint-<step> folder written by this script."
            )
        return path

    @staticmethod
    def step_of(path: Path) -> int:
        return json.loads((Path(path) / CheckpointManager.MARKER).read_text())["step"]

    def remove_partial(self) -> None:
        """Delete `.tmp-*` / `.trash-*` leftovers of a killed run (main process), then sync all processes."""
        if self.accelerator.is_main_process and self.output_dir.is_dir():
            for path in self.output_dir.iterdir():
                if path.name.startswith((".tmp-checkpoint-", ".trash-checkpoint-")):
                    shutil.rmtree(path)
        self.accelerator.wait_for_everyone()

    def save(self, step: int) -> Path:
        tmp = self.output_dir / f".tmp-checkpoint-{step}"
        final = self.output_dir / f"checkpoint-{step}"
        if self.accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            (tmp / self.MARKER).write_text(json.dumps({"step": step}))
            _fsync_tree(tmp)
            if final.exists():  # re-saving a step (resumed from an older checkpoint): swap, never merge
                trash = self.output_dir / f".trash-checkpoint-{step}"
                os.replace(final, trash)
                os.replace(tmp, final)
                shutil.rmtree(trash)
            else:
                os.replace(tmp, final)
            _fsync_dir(self.output_dir)
            self._prune()
            logger.info(f"Saved checkpoint {final}")
        self.accelerator.wait_for_everyone()
        return final

    def _prune(self) -> None:
        if self.total_limit is None:
            return
        found = self.complete()
        for _, path in found[: max(0, len(found) - self.total_limit)]:
            trash = path.with_name(".trash-" + path.name)
            os.replace(path, trash)
            shutil.rmtree(trash)
            logger.info(f"Removed old checkpoint {path}")


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


class EpochSampler(Sampler):
    """Yields (index, augmentation_seed) for every item: a shuffled order and one seed per item, both pure functions
    of (seed, epoch). Call `set_epoch` before iterating (accelerate's prepared dataloader forwards it)."""

    def __init__(self, num_items: int, seed: int, shuffle: bool = True):
        if num_items < 1:
            raise ValueError(f"`num_items` must be >= 1, got {num_items}.")
        self.num_items, self.seed, self.shuffle, self.epoch = num_items, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self):
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        order = torch.randperm(self.num_items, generator=gen) if self.shuffle else torch.arange(self.num_items)
        aug_seeds = torch.randint(0, 2**62, (self.num_items,), generator=gen)
        yield from zip(order.tolist(), aug_seeds.tolist())


def _split_key(key: int | tuple[int, int]) -> tuple[int, random.Random | None]:
    """Dataset key: an index (no random augmentation) or (index, augmentation_seed) from `EpochSampler`."""
    if isinstance(key, tuple):
        return key[0], random.Random(key[1])
    return key, None


def preprocess_image(
    image: Image.Image, resolution: int, channels: int = 3, center_crop: bool = True, rng: random.Random | None = None
) -> torch.Tensor:
    """PIL image -> float [channels, resolution, resolution] in [-1, 1].

    Resize so the short side is `resolution` (box-filter halvings while the image is ≥ 2× too large, then bicubic,
    as ADM does), then crop: centred, or at a position drawn from `rng` when `center_crop` is False and an `rng` is
    given. `channels` 1 gives grayscale ("L"), 3 gives RGB.
    """
    if channels not in (1, 3):
        raise ValueError(f"`channels` must be 1 (grayscale) or 3 (RGB), got {channels}.")
    image = image.convert("L" if channels == 1 else "RGB")
    while min(image.size) >= 2 * resolution:
        image = image.resize((image.width // 2, image.height // 2), Image.Resampling.BOX)
    scale = resolution / min(image.size)
    image = image.resize((max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))),
                         Image.Resampling.BICUBIC)
    if center_crop or rng is None:
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    else:
        left, top = rng.randint(0, image.width - resolution), rng.randint(0, image.height - resolution)
    array = np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.float32)
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


class _ImageFiles:
    """index -> PIL image of a list of files (a picklable loader, for dataloader workers started with spawn)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __call__(self, index: int) -> Image.Image:
        with Image.open(self.paths[index]) as image:
            return image.copy()


class _HubImages:
    """index -> PIL image of a 🤗 `datasets` column."""

    def __init__(self, data, column: str):
        self.data, self.column = data, column

    def __call__(self, index: int) -> Image.Image:
        return self.data[index][self.column]


class ImageDataset(Dataset):
    """Images with integer labels, preprocessed by `preprocess_image`; horizontal flips and crop positions come from
    the key's augmentation seed (see `EpochSampler`). Items: {"pixel_values": [C, R, R], "class_labels": int}.

    Build with `from_folder` (one sub-folder per class, sorted names -> ids 0..K-1; a folder without sub-folders is
    an unconditional dataset with `classes` None) or `from_hub` (🤗 `datasets`, optional dependency).
    """

    def __init__(
        self,
        load_image: Callable[[int], Image.Image],
        labels: Sequence[int],
        classes: list[str] | None,
        resolution: int,
        channels: int = 3,
        center_crop: bool = False,
        random_flip: bool = False,
    ):
        if len(labels) == 0:
            raise ValueError("The dataset is empty.")
        self.load_image, self.labels, self.classes = load_image, list(labels), classes
        self.resolution, self.channels = resolution, channels
        self.center_crop, self.random_flip = center_crop, random_flip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, rng = _split_key(key)
        pixels = preprocess_image(self.load_image(index), self.resolution, self.channels, self.center_crop, rng)
        if self.random_flip and rng is not None and rng.random() < 0.5:
            pixels = pixels.flip(-1)
        return {"pixel_values": pixels, "class_labels": self.labels[index]}

    @classmethod
    def from_folder(cls, root: str | os.PathLike, resolution: int, **kwargs) -> "ImageDataset":
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"`train_data_dir` {str(root)!r} is not a directory.")

        def images_in(folder: Path) -> list[Path]:
            return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())

        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if class_dirs:
            classes = [p.name for p in class_dirs]
            files = [(f, label) for label, d in enumerate(class_dirs) for f in images_in(d)]
        else:
            classes, files = None, [(f, 0) for f in images_in(root)]
        if not files:
            raise ValueError(f"`train_data_dir` {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
        return cls(_ImageFiles([f for f, _ in files]), [label for _, label in files], classes, resolution, **kwargs)

    @classmethod
    def from_hub(
        cls,
        dataset_name: str,
        resolution: int,
        split: str = "train",
        image_column: str = "image",
        label_column: str | None = "label",
        config_name: str | None = None,
        cache_dir: str | None = None,
        **kwargs,
    ) -> "ImageDataset":
        try:
            import datasets
        except ImportError as e:
            raise ImportError("`--dataset_name` needs the `datasets` package: pip install datasets") from e
        data = datasets.load_dataset(dataset_name, config_name, split=split, cache_dir=cache_dir)
        if image_column not in data.column_names:
            raise ValueError(f"`image_column` {image_column!r} is not a column of {dataset_name}: {data.column_names}.")
        if label_column is not None and label_column in data.column_names:
            labels = data[label_column]
            feature = data.features[label_column]
            classes = list(feature.names) if hasattr(feature, "names") else [str(i) for i in sorted(set(labels))]
        else:
            labels, classes = [0] * len(data), None
        return cls(_HubImages(data, image_column), labels, classes, resolution, **kwargs)


def load_vae(name_or_path: str | os.PathLike) -> AutoencoderKL:
    """An `AutoencoderKL` from a VAE folder or Hub id, or from the `vae` sub-folder of a pipeline folder or Hub id."""
    path = Path(name_or_path)
    if path.is_dir():
        subfolder = "vae" if (path / "vae" / "config.json").is_file() else None
        return AutoencoderKL.from_pretrained(path, subfolder=subfolder)
    try:
        return AutoencoderKL.from_pretrained(name_or_path)
    except EnvironmentError:
        return AutoencoderKL.from_pretrained(name_or_path, subfolder="vae")


class LatentDataset(Dataset):
    """VAE moments cached by `examples/precompute_latents.py`: `metadata.json` and `shard-*.safetensors` holding
    "moments" [n, 2·C, h, w] (mean ‖ logvar of the VAE posterior), "labels" int64 [n], and "moments_flipped" when
    encoded with flips. Items: {"moments": [2·C, h, w], "class_labels": int}; with `random_flip` the flipped moments
    are taken when the key's augmentation seed says so. Shards are read lazily (one row at a time)."""

    def __init__(self, latents_dir: str | os.PathLike, random_flip: bool = False):
        self.root = Path(latents_dir)
        meta_path = self.root / "metadata.json"
        if not meta_path.is_file():
            raise ValueError(
                f"`latents_dir` {str(latents_dir)!r} has no metadata.json; run precompute_latents.py first."
            )
        self.metadata = json.loads(meta_path.read_text())
        if random_flip and not self.metadata["flip"]:
            raise ValueError(
                f"`random_flip` needs flipped latents, but {str(latents_dir)!r} was encoded without --flip."
            )
        self.random_flip = random_flip
        self.classes = self.metadata["classes"]
        self.shard_size = self.metadata["shard_size"]
        self.shards = [self.root / name for name in self.metadata["shards"]]
        self.num_items = self.metadata["num_items"]
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return self.num_items

    def _shard(self, i: int):
        if i not in self._open:
            self._open[i] = safe_open(str(self.shards[i]), framework="pt")
        return self._open[i]

    def __getstate__(self):  # file handles do not travel to dataloader workers
        return {**self.__dict__, "_open": {}}

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, rng = _split_key(key)
        if not 0 <= index < self.num_items:
            raise IndexError(index)
        shard, row = divmod(index, self.shard_size)
        name = "moments_flipped" if self.random_flip and rng is not None and rng.random() < 0.5 else "moments"
        f = self._shard(shard)
        return {
            "moments": f.get_slice(name)[row : row + 1][0].float(),
            "class_labels": int(f.get_slice("labels")[row : row + 1][0]),
        }
