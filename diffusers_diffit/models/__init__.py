from .attention import DiffiTAttention, DiffiTAttnProcessor, DiffiTTransformerBlock
from .transformer_diffit import DIFFIT_CONFIGS, DiffiTTransformer2DModel
from .unet_diffit import DIFFIT_UNET_CONFIGS, DiffiTResBlock, DiffiTUNet2DModel


__all__ = [
    "DIFFIT_CONFIGS",
    "DIFFIT_UNET_CONFIGS",
    "DiffiTAttention",
    "DiffiTAttnProcessor",
    "DiffiTResBlock",
    "DiffiTTransformer2DModel",
    "DiffiTTransformerBlock",
    "DiffiTUNet2DModel",
]
