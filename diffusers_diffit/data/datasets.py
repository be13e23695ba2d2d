"""Training data: labelled images (a folder or a 🤗 `datasets` dataset) and VAE latents cached by
`examples/precompute_latents.py`.

The data order is accelerate's (`DataLoaderConfiguration(use_seedable_sampler=True)`: one shuffle per epoch, a pure
function of the seed and the epoch). Random crops and flips are drawn per item from (seed, epoch, index); accelerate's
prepared dataloader passes the epoch on through `set_epoch`. So every item of a resumed run is what an uninterrupted
run would have seen.
"""

import hashlib
import json
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors import safe_open
from torch.utils.data import Dataset

from ..seeding import derive_seed


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def preprocess_image(
    image: Image.Image, resolution: int, channels: int = 3, center_crop: bool = True, rng: random.Random | None = None
) -> torch.Tensor:
    """PIL image -> float [channels, resolution, resolution] in [-1, 1].

    Resize so the short side is `resolution` (box-filter halvings while the image is ≥ 2× too large, then bicubic,
    as ADM does), then crop: centred, or at a position drawn from `rng` when `center_crop` is False and an `rng` is
    given. `channels` 1 gives grayscale, 3 gives RGB. 16-bit grayscale images (PIL mode "I;16") keep their full
    precision: their 0…65535 range maps to [-1, 1] like 0…255 does for 8-bit images.
    """
    if channels not in (1, 3):
        raise ValueError(f"`channels` must be 1 (grayscale) or 3 (RGB), got {channels}.")
    if image.mode in ("I;16", "I;16B", "I;16L") and channels == 1:
        image, full_scale = image.convert("F"), 65535.0
    else:
        image, full_scale = image.convert("L" if channels == 1 else "RGB"), 255.0
    while min(image.size) >= 2 * resolution:
        image = image.resize((image.width // 2, image.height // 2), Image.Resampling.BOX)
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    if center_crop or rng is None:
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    else:
        left, top = rng.randint(0, image.width - resolution), rng.randint(0, image.height - resolution)
    array = np.array(image.crop((left, top, left + resolution, top + resolution)), dtype=np.float32)
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array).permute(2, 0, 1) * (2 / full_scale) - 1.0


class _SeededDataset(Dataset):
    """Random augmentation per item from (seed, epoch, index); `set_epoch` is called by accelerate's dataloader."""

    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self, index: int) -> random.Random:
        return random.Random(derive_seed(self.seed, self.epoch, index))


class _ImageFiles:
    """index -> PIL image of a list of files (a picklable loader, for dataloader workers started with spawn)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __call__(self, index: int) -> Image.Image:
        return read_image(self.paths[index])


def read_image(path: Path) -> Image.Image:
    """The decoded image at `path`; a file PIL cannot decode raises a `ValueError` naming it."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise ValueError(f"{str(path)!r} is not a readable image: {e}") from None


class _HubImages:
    """index -> PIL image of a 🤗 `datasets` column."""

    def __init__(self, data, column: str):
        self.data, self.column = data, column

    def __call__(self, index: int) -> Image.Image:
        return self.data[index][self.column]


class ImageDataset(_SeededDataset):
    """Images with integer labels, preprocessed by `preprocess_image`, with random crops (unless `center_crop`) and
    horizontal flips (with `random_flip`). Items: {"pixel_values": [C, R, R], "class_labels": int}.

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
        seed: int = 0,
    ):
        if len(labels) == 0:
            raise ValueError("The dataset is empty.")
        self.load_image, self.labels, self.classes = load_image, list(labels), classes
        self.resolution, self.channels = resolution, channels
        self.center_crop, self.random_flip, self.seed = center_crop, random_flip, seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        rng = self._rng(index) if self.random_flip or not self.center_crop else None
        pixels = preprocess_image(self.load_image(index), self.resolution, self.channels, self.center_crop, rng)
        if self.random_flip and rng.random() < 0.5:
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
        read_image(files[0][0])  # fail here, naming the file, rather than in the first batch
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
            raise ValueError(
                f"`image_column` {image_column!r} is not a column of {dataset_name}: {data.column_names}."
            )
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


def vae_fingerprint(vae: AutoencoderKL) -> str:
    """SHA-256 of a VAE's weights and of the latent normalisation of its config (`scaling_factor`, `shift_factor`):
    what cached latents depend on. `precompute_latents.py` stores it; training compares it with the run's VAE."""
    digest = hashlib.sha256()
    config = {k: getattr(vae.config, k, None) for k in ("scaling_factor", "shift_factor")}
    digest.update(json.dumps(config, sort_keys=True).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def latents_vae_location(latents_dir: str | os.PathLike) -> str:
    """Where the VAE that `latents_dir` was encoded with is: its recorded path as it was typed, tried from the current
    folder, then the absolute path recorded beside it (a run started from another folder), else the recorded text as a
    Hub id. A recorded path found nowhere raises a `ValueError` naming it."""
    metadata = json.loads((Path(latents_dir) / "metadata.json").read_text())
    typed, absolute = metadata["vae"], metadata.get("vae_path")
    if Path(typed).is_dir():
        return typed
    if absolute and Path(absolute).is_dir():
        return absolute
    if absolute:  # it was a local folder when the latents were made
        raise ValueError(
            f"The VAE the latents in {str(latents_dir)!r} were encoded with, {typed!r} (then at {absolute!r}), is not "
            "there any more; pass it with --vae."
        )
    return typed


class LatentDataset(_SeededDataset):
    """VAE moments cached by `examples/precompute_latents.py`: `metadata.json` and `shard-*.safetensors` holding
    "moments" [n, 2·C, h, w] (mean ‖ logvar of the VAE posterior), "labels" int64 [n], and "moments_flipped" when
    encoded with flips. Items: {"moments": [2·C, h, w], "class_labels": int}; with `random_flip` the flipped moments
    are taken for half the items. Shards are read lazily (one row at a time)."""

    def __init__(self, latents_dir: str | os.PathLike, random_flip: bool = False, seed: int = 0):
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
        self.random_flip, self.seed = random_flip, seed
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

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_items:
            raise IndexError(index)
        shard, row = divmod(index, self.shard_size)
        name = "moments_flipped" if self.random_flip and self._rng(index).random() < 0.5 else "moments"
        f = self._shard(shard)
        return {
            "moments": f.get_slice(name)[row : row + 1][0].float(),
            "class_labels": int(f.get_slice("labels")[row : row + 1][0]),
        }
