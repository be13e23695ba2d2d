"""The digits benchmark: scikit-learn's bundled digits as training data for the model that ships inside the package,
and the two models compared on it.

- Data: 1797 8×8 images, ink 0…16, 10 classes. 50 random images per class are held out for
  `benchmarks/quality_digits.py` (`digits_split`); training uses the other 1297. Pixel = ink / 16 mapped to [-1, 1]
  (bright digits on a dark background), bilinearly upsampled to 16×16: the source holds 8×8 worth of information,
  and 16×16 keeps three U-Net levels (16, 8, 4) with windowed attention at 16 and 8 and global attention at 4.
- `write_digits_folder` writes the training split as an ordinary image folder (one sub-folder per class, 16-bit
  grayscale PNGs, exact to 1/65535), which `examples/train_diffit.py --train_data_dir` reads like any other.
- The two models compared (named configurations in `diffusers_diffit.configs`): `DiffiT-digits`, the shipped
  `DiffiTUNet2DModel` (widths 32, 64, 64, one DiffiT ResBlock per level and side, window 4, head dim 16; 758,453
  parameters), and `UNet2D-digits`, diffusers' `UNet2DModel` of about the same size (729,569: ResNet blocks,
  attention at 8×8 and 4×4), the baseline of the quality table in docs/digits-benchmarks.md.

Needs scikit-learn (the `train` and `test` extras).
"""

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


NUM_CLASSES = 10
HELD_OUT_PER_CLASS = 50
RESOLUTION = 16

# The shipped latent model `digits-latent` (`DiffiT-digits-latent` in diffusers_diffit.configs) draws 32×32 images
# through the digits VAE (spatial factor 8 as the SD-VAE's; examples/digits_vae.args) and is trained by
# examples/digits_latent.args.
LATENT_RESOLUTION = 32


# NVIDIA's sampling recipe (DDPM with the learned-range variance, 250 steps, guidance on the first 3 latent channels
# with the power-cosine ramp; `OFFICIAL_RECIPES[256]`) at the guidance scale that suits the digits (3: accuracy 99 %,
# the lowest FD being at 2, docs/digits-latent.md)
LATENT_OFFICIAL_RECIPE = dict(
    num_inference_steps=250,
    guidance_scale=3.0,
    guidance_schedule="power-cosine",
    guidance_power=4.0,
    guided_channels=3,
)


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train ink [1297, 8, 8], train labels, held-out ink [500, 8, 8], held-out labels), ink in [0, 1]: 50 images
    per class, drawn at random with `seed`, are held out."""
    from sklearn.datasets import load_digits

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


def ink_to_model(ink: np.ndarray | torch.Tensor, size: int = RESOLUTION) -> torch.Tensor:
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


def write_digits_folder(root: str | os.PathLike, size: int = RESOLUTION) -> int:
    """Write the training split into `root`/<digit>/<index>.png as 16-bit grayscale PNGs of `ink_to_model` images;
    returns the number of images."""
    train_ink, train_labels, _, _ = digits_split()
    images = ink_to_model(train_ink, size)[:, 0]  # [N, size, size] in [-1, 1]
    levels = ((images + 1) / 2 * 65535).round().to(torch.int32).numpy().astype(np.uint16)
    for index, (pixels, label) in enumerate(zip(levels, train_labels)):
        folder = Path(root) / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{index:04d}.png")
    return len(levels)
