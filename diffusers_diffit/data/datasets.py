"""Training data: labelled images (a folder or a 🤗 `datasets` dataset) and VAE latents cached by
`examples/precompute_latents.py`.

The data order is accelerate's (`DataLoaderConfiguration(use_seedable_sampler=True)`: one shuffle per epoch, a pure
function of the seed and the epoch). Random crops and flips are drawn per item from (seed, epoch, index); accelerate's
prepared dataloader passes the epoch on through `set_epoch`. So every item of a resumed run is what an uninterrupted
run would have seen.
"""

import hashlib
import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors import SafetensorError, safe_open
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..seeding import derive_seed


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
ON_BAD_IMAGE = ("error", "skip")
logger = logging.getLogger(__name__)


def preprocess_image(
    image: Image.Image, resolution: int, channels: int = 3, center_crop: bool = True, rng: random.Random | None = None
) -> torch.Tensor:
    """PIL image -> float [channels, resolution, resolution] in [-1, 1].

    Resize so the short side is `resolution` (box-filter halvings while the image is ≥ 2× too large, then bicubic,
    as ADM does; an image smaller than `resolution` is upscaled, as diffusers' training scripts do), then crop:
    centred, or at a position drawn from `rng` when `center_crop` is False and an `rng` is given. `channels` 1 gives
    grayscale, 3 gives RGB, from any mode of `CONVERTIBLE_MODES` (see `to_channels`).
    """
    if channels not in (1, 3):
        raise ValueError(f"`channels` must be 1 (grayscale) or 3 (RGB), got {channels}.")
    image, full_scale = to_channels(image, channels)
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
    if array.shape[2] != channels:  # 16-bit grayscale for an RGB model
        array = array.repeat(channels, axis=2)
    return torch.from_numpy(array).permute(2, 0, 1) * (2 / full_scale) - 1.0


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L")
# PIL modes that `to_channels` converts; others ("I", "F": 32-bit values with no known range; "LAB", "HSV") are
# refused by `check_image_file`.
CONVERTIBLE_MODES = (
    "1",
    "L",
    "P",
    "LA",
    "PA",
    "RGB",
    "RGBA",
    "RGBX",
    "RGBa",
    "La",
    "CMYK",
    "YCbCr",
    *SIXTEEN_BIT_MODES,
)


def to_channels(image: Image.Image, channels: int) -> tuple[Image.Image, float]:
    """(image in mode "L" or "RGB", or "F" for 16-bit grayscale, its full-scale value). Transparent images (an alpha
    channel, or a palette with a transparent colour) are composited on white, as a viewer shows them on a white page;
    palette, CMYK, YCbCr and 1-bit images take PIL's conversion. 16-bit grayscale keeps its full precision: 0…65535
    maps to [-1, 1] like 0…255 does for 8-bit images (for an RGB model, the three channels are equal)."""
    if image.mode in SIXTEEN_BIT_MODES:
        return image.convert("F"), 65535.0
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return image.convert("L" if channels == 1 else "RGB"), 255.0


class _SeededDataset(Dataset):
    """Random augmentation per item from (seed, epoch, index); `set_epoch` is called by accelerate's dataloader."""

    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self, index: int) -> random.Random:
        return random.Random(derive_seed(self.seed, self.epoch, index))


def image_files_in(folder: Path) -> list[Path]:
    """The files under `folder` with an image extension, sorted; hidden ones (".*", e.g. macOS "._x.png") left out."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


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


def check_image_file(path: Path) -> tuple[int, int]:
    """(width, height) of an image file that training can read, from its header; a `ValueError` naming the file and
    the reason otherwise: empty, not an image, a mode `to_channels` does not convert, a PNG whose chunks fail their
    checksums (truncated or corrupt), a JPEG that ends without its end-of-image marker and then fails to decode.
    Pixels are decoded only in that last case (a JPEG may carry bytes after the marker), so a scan costs about a
    file read per image."""
    if path.stat().st_size == 0:
        raise ValueError(f"{str(path)!r} is empty (0 bytes).")
    try:
        with Image.open(path) as image:
            size, mode, image_format = image.size, image.mode, image.format
            image.verify()  # PNG: every chunk's CRC up to IEND; other formats: the header
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{str(path)!r} is not a readable image: {e}") from None
    if mode not in CONVERTIBLE_MODES:
        raise ValueError(f"{str(path)!r} has PIL mode {mode!r}, which is not converted; allowed: {CONVERTIBLE_MODES}.")
    if image_format == "JPEG":
        with open(path, "rb") as f:
            f.seek(-2, os.SEEK_END)
            if f.read() != b"\xff\xd9":
                read_image(path)  # truncated, unless the data after the marker is all that differs
    return size


def scan_image_files(paths: list[Path], resolution: int, on_bad_image: str = "error") -> list[int]:
    """Indices of the files in `paths` that `check_image_file` accepts. A bad file raises its `ValueError` with
    `on_bad_image` "error", or is logged and left out with "skip" (the count is logged too). Images smaller than
    `resolution` are kept (they are upscaled) and counted in the log."""
    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"`on_bad_image` must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}.")
    usable, small = [], 0
    for index, path in enumerate(tqdm(paths, desc="checking images", unit="file", disable=len(paths) < 1000)):
        try:
            size = check_image_file(path)
        except ValueError as e:
            if on_bad_image == "error":
                raise ValueError(f"{e} Pass on_bad_image='skip' (--on_bad_image skip) to train without it.") from None
            logger.warning(f"Skipping {e}")
            continue
        usable.append(index)
        small += min(size) < resolution
    if len(usable) < len(paths):
        logger.warning(f"Skipped {len(paths) - len(usable)} of {len(paths)} images that cannot be read.")
    if small:
        logger.info(f"{small} of {len(usable)} images are smaller than {resolution} px; they are upscaled (bicubic).")
    return usable


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
    def from_folder(
        cls,
        root: str | os.PathLike,
        resolution: int,
        on_bad_image: str = "error",
        allow_empty_classes: bool = False,
        **kwargs,
    ) -> "ImageDataset":
        """The images under `root` (hidden files and folders left out), checked by `scan_image_files` with
        `on_bad_image`. A class folder without usable images is an error naming it, unless `allow_empty_classes`:
        then it keeps its class id (the ids of the classes after it do not change) and has no items."""
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"`train_data_dir` {str(root)!r} is not a directory.")
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if class_dirs:
            classes = [p.name for p in class_dirs]
            files = [(f, label) for label, d in enumerate(class_dirs) for f in image_files_in(d)]
        else:
            classes, files = None, [(f, 0) for f in image_files_in(root)]
        if not files:
            raise ValueError(f"`train_data_dir` {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
        files = [files[i] for i in scan_image_files([f for f, _ in files], resolution, on_bad_image)]
        if not files:
            raise ValueError(f"`train_data_dir` {str(root)!r} holds no usable images: every one was skipped.")
        present = {label for _, label in files}
        empty = [str(d) for label, d in enumerate(class_dirs) if label not in present]
        if empty and not allow_empty_classes:
            raise ValueError(
                f"The class folder(s) {empty} hold no usable images; as classes they would have ids but no data. "
                "Remove them, or pass allow_empty_classes=True (--allow_empty_classes) to keep their ids."
            )
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
        self.check_shards()

    def check_shards(self) -> None:
        """Every shard is there, readable, and holds only finite moments; a `ValueError` naming the file otherwise.
        Reads every shard once (about the time it takes to read the cache from disk), one shard in memory at a time."""
        for shard, path in enumerate(self.shards):
            try:
                with safe_open(str(path), framework="pt") as f:
                    tensors = {name: f.get_tensor(name) for name in f.keys() if name.startswith("moments")}
            except (OSError, SafetensorError) as e:  # missing, truncated or damaged
                raise ValueError(f"{str(path)!r} cannot be read ({e}); run precompute_latents.py again.") from None
            for name, moments in tensors.items():
                bad = (~torch.isfinite(moments.flatten(1)).all(1)).nonzero().flatten()
                if len(bad):
                    raise ValueError(
                        f"{str(path)!r} holds non-finite {name!r} (NaN or inf) for {len(bad)} of {len(moments)} "
                        f"items, the first item {shard * self.shard_size + bad[0].item()}; encode them again with "
                        "precompute_latents.py."
                    )

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
