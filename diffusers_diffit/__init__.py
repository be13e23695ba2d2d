"""DiffiT (Diffusion Vision Transformers, ECCV 2024) for Hugging Face diffusers."""

__version__ = "0.1.0"

from .models import (
    DIFFIT_CONFIGS,
    DiffiTAttention,
    DiffiTAttnProcessor,
    DiffiTTransformer2DModel,
    DiffiTTransformerBlock,
)

__all__ = [
    "DIFFIT_CONFIGS",
    "DiffiTAttention",
    "DiffiTAttnProcessor",
    "DiffiTTransformer2DModel",
    "DiffiTTransformerBlock",
]
