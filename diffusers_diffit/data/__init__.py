"""Training data: image folders, 🤗 datasets and cached latents (`datasets`), and the digits benchmark (`digits`,
imported on its own: it needs scikit-learn). Package data: `imagenet_labels.json`."""

from .datasets import IMAGE_EXTENSIONS, ImageDataset, LatentDataset, load_vae, preprocess_image


__all__ = ["IMAGE_EXTENSIONS", "ImageDataset", "LatentDataset", "load_vae", "preprocess_image"]
