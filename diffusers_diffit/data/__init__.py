"""Training data: image folders, 🤗 datasets and cached latents (`datasets`), and the digits benchmark (`digits`,
imported on its own: it needs scikit-learn). Package data: `imagenet_labels.json`."""

from .datasets import (
    IMAGE_EXTENSIONS,
    ON_BAD_IMAGE,
    ImageDataset,
    LatentDataset,
    latents_vae_location,
    load_vae,
    preprocess_image,
    vae_fingerprint,
)


__all__ = [
    "IMAGE_EXTENSIONS",
    "ON_BAD_IMAGE",
    "ImageDataset",
    "LatentDataset",
    "latents_vae_location",
    "load_vae",
    "preprocess_image",
    "vae_fingerprint",
]
