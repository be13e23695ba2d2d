"""Images in ADM's layout, batched feature extraction with any `nn.Module`, and the two feature networks.

Images are what ADM's evaluator reads: uint8 [N, H, W, 3] (NHWC, 0…255), the `arr_0` of an npz, or a folder of
image files. An extractor is any `nn.Module` that takes a uint8 batch [B, 3, H, W] (NCHW, on its device) and returns
a tensor [B, D] or a dict {name: tensor [B, D_name]}; `extract_features` returns numpy arrays of the same structure.

- `InceptionFeatureExtractor`: torch-fidelity's PyTorch port of the TF Inception-v3 graph ADM uses
  (`classify_image_graph_def.pb`, 2015-12-05), with its weights file. Preprocessing as in that graph, done by
  torch-fidelity: TF 1.x bilinear resize to 299 × 299 (align_corners=False, no half-pixel centres), (x − 128)/128.
  Outputs "pool" (`pool_3`,
  2048), "spatial" (the first 7 channels of `mixed_6/conv` = `Mixed_6d.branch1x1` after its ReLU, 17 × 17, flattened
  in ADM's NHWC order: 2023) and "logits" (pool @ W of `softmax/logits` without the bias, 1008 classes, as ADM's
  Inception Score).
- `DINOv2FeatureExtractor`: transformers' `Dinov2Model` (ViT-L/14 by default, as Stein et al. 2023): bicubic resize
  to 224 × 224, ImageNet mean/std, the final-layer-normed CLS token ("dinov2", 1024 for ViT-L).
"""

import logging
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_WEIGHTS_ENV = "DIFFIT_INCEPTION_WEIGHTS"
DEFAULT_DINOV2 = "facebook/dinov2-large"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------------- images


def check_images(images, name: str = "images") -> np.ndarray:
    """`images` as uint8 [N, H, W, 3] (ADM's layout), else `ValueError` naming `name` and what is expected.

    Integer arrays in [0, 255] are accepted and converted; floats are refused (convert with
    `(x * 255).astype(np.uint8)` from [0, 1], the truncation ADM's samplers use)."""
    if torch.is_tensor(images):
        images = images.detach().cpu().numpy()
    if not isinstance(images, np.ndarray):
        images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"`{name}` must be [N, H, W, 3] (NHWC, RGB) as in ADM's npz, got shape {images.shape}.")
    if len(images) == 0:
        raise ValueError(f"`{name}` holds no images.")
    if images.dtype == np.uint8:
        return images
    if images.dtype.kind not in "iu":
        raise ValueError(f"`{name}` must be uint8 in [0, 255] (ADM's layout), got dtype {images.dtype}.")
    low, high = images.min(), images.max()
    if low < 0 or high > 255:
        raise ValueError(f"`{name}` must lie in [0, 255], got values in [{low}, {high}].")
    return images.astype(np.uint8)


class ImageFiles:
    """The image files of a folder (sorted by name) as a lazy uint8 [N, H, W, 3] array: `images[a:b]` reads only
    those files (grayscale replicated to RGB); every image must have the first one's size."""

    def __init__(self, folder: Path, name: str = "images"):
        self.files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        self.name = name
        if not self.files:
            raise ValueError(f"`{name}` {str(folder)!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)}).")
        self.shape = (len(self.files), *self._read(self.files[0]).shape)

    def _read(self, file: Path) -> np.ndarray:
        from PIL import Image

        with Image.open(file) as image:
            return np.asarray(image.convert("RGB"))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice):
            raise TypeError("ImageFiles supports slices only, e.g. images[0:100].")
        out = []
        for file in self.files[index]:
            pixels = self._read(file)
            if pixels.shape != self.shape[1:]:
                raise ValueError(f"`{self.name}`: {file.name} is {pixels.shape}, the first image {self.shape[1:]}.")
            out.append(pixels)
        return np.stack(out) if out else np.empty((0, *self.shape[1:]), dtype=np.uint8)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        images = self[:]
        return images if dtype is None else images.astype(dtype)


def _npz_member_offset(path: Path, key: str) -> tuple[int, tuple, np.dtype] | None:
    """(byte offset, shape, dtype) of the uncompressed array `key` inside the npz at `path`, for a memory map;
    None when it is compressed or Fortran-ordered."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{key}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                return None
            header_size = member.tell()
    with open(path, "rb") as f:  # the member's data starts after its local file header
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), dtype="<u2")
    if fortran or dtype.hasobject:
        return None
    return info.header_offset + 30 + int(name_len) + int(extra_len) + header_size, shape, dtype


def load_images(path: str | os.PathLike, name: str = "--samples") -> np.ndarray:
    """uint8 [N, H, W, 3] from an ADM npz (`arr_0`; memory-mapped when stored uncompressed, as `np.savez` writes)
    or from a folder of image files (`ImageFiles`: read batch by batch, sorted by name, all one size)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"`{name}` {str(path)!r} does not exist.")
    if path.is_dir():
        return ImageFiles(path, name)
    if path.suffix != ".npz":
        raise ValueError(f"`{name}` must be an .npz file or a folder of images, got {str(path)!r}.")
    with np.load(path) as npz:
        if "arr_0" not in npz.files:
            raise ValueError(f"`{name}` {str(path)!r} has no `arr_0` (images); it holds {npz.files}.")
    located = _npz_member_offset(path, "arr_0")
    if located is not None:
        offset, shape, dtype = located
        images = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    else:
        with np.load(path) as npz:
            images = npz["arr_0"]
    return check_images(images, name)


def save_npz(path: str | os.PathLike, images: np.ndarray | None = None, statistics: dict | None = None, **arrays):
    """Write an npz in ADM's layout: `arr_0` uint8 [N, H, W, 3] and, optionally, reference statistics as
    {"mu": …, "sigma": …, "mu_s": …, "sigma_s": …} (any further arrays, e.g. `labels`, as keywords)."""
    content = dict(arrays)
    if images is not None:
        content["arr_0"] = check_images(images)
    for key, value in (statistics or {}).items():
        content[key] = np.asarray(value)
    np.savez(path, **content)


# ----------------------------------------------------------------------------------------------------- extraction


@torch.no_grad()
def extract_features(
    images,
    extractor: nn.Module,
    batch_size: int = 100,
    device: str | torch.device | None = None,
    distributed: bool = False,
    progress: bool = True,
) -> np.ndarray | dict[str, np.ndarray]:
    """Run `extractor` over `images` (uint8 [N, H, W, 3]) in batches of `batch_size`; float32 features [N, D] (or a
    dict of them, as the extractor returns). Only one batch of images is on the device at a time.

    `distributed=True` (under `accelerate launch`): each process takes a contiguous share of the images and every
    process gets all N rows back, in order (accelerate's `gather`)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}.")
    if not isinstance(images, (np.memmap, ImageFiles)):  # those are checked when opened / read
        images = check_images(images)
    device = torch.device(device) if device is not None else next(extractor.parameters(), torch.empty(0)).device
    start, stop, state = 0, len(images), None
    if distributed:
        state = process_state()
        share = math.ceil(len(images) / state.num_processes)
        start = min(state.process_index * share, len(images))
        stop = min(start + share, len(images))
    outputs = []
    show = progress and (state is None or state.is_local_main_process)
    for b0 in tqdm(range(start, stop, batch_size), desc="features", disable=not show):
        batch = torch.from_numpy(np.array(images[b0 : min(b0 + batch_size, stop)]))  # a copy: memmaps are read-only
        batch = batch.to(device).permute(0, 3, 1, 2)  # [B, 3, H, W] uint8
        out = extractor(batch)
        outputs.append({k: v.float().cpu() for k, v in out.items()} if isinstance(out, dict) else out.float().cpu())
    if not outputs:  # a process with an empty share (more processes than images)
        probe = extractor(torch.from_numpy(np.array(images[:1])).to(device).permute(0, 3, 1, 2))
        outputs.append(
            {k: v[:0].float().cpu() for k, v in probe.items()} if isinstance(probe, dict) else probe[:0].float().cpu()
        )
    if isinstance(outputs[0], dict):
        features = {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}
    else:
        features = torch.cat(outputs)
    if state is not None and state.num_processes > 1:
        features = _gather_in_order(features, len(images), share, state)
    if isinstance(features, dict):
        return {k: v.numpy() for k, v in features.items()}
    return features.numpy()


def process_state():
    """accelerate's `PartialState` of this process; on CPUs `accelerate launch` needs ACCELERATE_USE_CPU=1 (else each
    process would run alone, which is refused)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != state.num_processes:
        raise ValueError(
            f"{launched} processes were launched but accelerate runs {state.num_processes}; on CPUs "
            "launch with ACCELERATE_USE_CPU=1."
        )
    return state


def _gather_in_order(features, total: int, share: int, state):
    """Every process's rows, padded to `share`, gathered and un-padded: all `total` rows in image order."""
    from accelerate.utils import gather

    def one(x: torch.Tensor) -> torch.Tensor:
        padded = torch.zeros(share, *x.shape[1:], dtype=x.dtype)
        padded[: len(x)] = x
        everything = gather(padded.to(state.device)).cpu()  # [num_processes · share, D]
        return everything[:total]  # shares are contiguous and only the last ones are short

    return {k: one(v) for k, v in features.items()} if isinstance(features, dict) else one(features)


# ----------------------------------------------------------------------------------------------------- networks


class InceptionFeatureExtractor(nn.Module):
    """ADM's Inception-v3 features (see the module docstring) from torch-fidelity's port.

    `network` is torch-fidelity's `FeatureExtractorInceptionV3` built with features_list ["2048", "logits_unbiased"]
    (uint8 [B, 3, H, W] -> (pool, logits without bias)); the spatial features are read by a hook on its
    `Mixed_6d.branch1x1` (TF's `mixed_6/conv`). `from_pretrained` builds it from the weights file."""

    SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network.eval().requires_grad_(False)
        self._spatial = None
        self.network.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        self._spatial = output

    @classmethod
    def from_pretrained(cls, weights_path: str | os.PathLike | None = None) -> "InceptionFeatureExtractor":
        """torch-fidelity's network with the weights at `weights_path`, else `$DIFFIT_INCEPTION_WEIGHTS`, else the file
        torch-fidelity caches in `torch.hub.get_dir()/checkpoints`; nothing is downloaded here."""
        path = resolve_inception_weights(weights_path)
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as error:
            raise ImportError(
                "The Inception network is torch-fidelity's port of ADM's TF graph: `pip install torch-fidelity` "
                "(or `pip install 'diffusers-diffit[eval]'`)."
            ) from error
        network = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path)
        )
        return cls(network)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 [B, 3, H, W] -> {"pool": [B, 2048], "spatial": [B, 2023], "logits": [B, 1008]}; the resize and
        normalisation are torch-fidelity's (its TF 1.x-exact bilinear resize)."""
        pool, logits = self.network(images)  # features_list ["2048", "logits_unbiased"]
        spatial = self._spatial[:, : self.SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # [B, 17·17·7], NHWC
        self._spatial = None
        return {"pool": pool.float(), "spatial": spatial.float(), "logits": logits.float()}


def resolve_inception_weights(weights_path: str | os.PathLike | None) -> Path:
    """The Inception weights file to use, or `FileNotFoundError` saying how to get it."""
    candidates = [weights_path] if weights_path is not None else [os.environ.get(INCEPTION_WEIGHTS_ENV)]
    if weights_path is None:
        candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / Path(INCEPTION_WEIGHTS_URL).name)
    for candidate in candidates:
        if candidate is not None and Path(candidate).is_file():
            return Path(candidate)
    where = repr(str(weights_path)) if weights_path is not None else "not given (`--inception-weights`)"
    raise FileNotFoundError(
        f"Inception-v3 weights {where} and not found at ${INCEPTION_WEIGHTS_ENV} or in torch's hub cache. Get "
        f"torch-fidelity's file (95 MB): `curl -L -o {Path(INCEPTION_WEIGHTS_URL).name} {INCEPTION_WEIGHTS_URL}` and "
        f"pass it with `--inception-weights` (or set ${INCEPTION_WEIGHTS_ENV})."
    )


class DINOv2FeatureExtractor(nn.Module):
    """FD-DINOv2 features (Stein et al. 2023): `model` is a transformers `Dinov2Model`; uint8 [B, 3, H, W] ->
    {"dinov2": [B, hidden_size]}, the CLS token after the final layer norm."""

    def __init__(self, model: nn.Module, resolution: int = 224):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.resolution = resolution
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_DINOV2, **kwargs) -> "DINOv2FeatureExtractor":
        """`Dinov2Model.from_pretrained(name_or_path)`: a local folder or a Hub id (downloaded by transformers into
        the Hub cache on first use; offline, it must already be there)."""
        try:
            from transformers import Dinov2Model
        except ImportError as error:
            raise ImportError("FD-DINOv2 needs transformers: `pip install 'diffusers-diffit[eval]'`.") from error
        try:
            model = Dinov2Model.from_pretrained(name_or_path, **kwargs)
        except OSError as error:
            raise FileNotFoundError(
                f"DINOv2 weights {name_or_path!r} could not be loaded ({error}). Pass a local folder with "
                f"`--dinov2-model`, or download them once with `huggingface-cli download {DEFAULT_DINOV2}` on a "
                "machine with Hub access."
            ) from error
        return cls(model)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.float() / 255
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", antialias=True).clamp(0, 1)
        x = (x - self.mean) / self.std
        out = self.model(pixel_values=x.to(self.model.dtype))
        return {"dinov2": out.last_hidden_state[:, 0]}  # [B, hidden] — last_hidden_state is layer-normed
