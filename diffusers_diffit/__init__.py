"""DiffiT (Diffusion Vision Transformers, ECCV 2024) for Hugging Face diffusers."""

__version__ = "0.1.0"

from .models import (
    DIFFIT_CONFIGS,
    DIFFIT_UNET_CONFIGS,
    DiffiTAttention,
    DiffiTAttnProcessor,
    DiffiTTransformer2DModel,
    DiffiTTransformerBlock,
    DiffiTUNet2DModel,
)
from .embedded import embedded_model_path
from .schedulers import EDMHeunScheduler

__all__ = [
    "DIFFIT_CONFIGS",
    "DIFFIT_UNET_CONFIGS",
    "DiffiTAttention",
    "DiffiTAttnProcessor",
    "DiffiTTransformer2DModel",
    "DiffiTTransformerBlock",
    "DiffiTUNet2DModel",
    "EDMHeunScheduler",
    "embedded_model_path",
]
