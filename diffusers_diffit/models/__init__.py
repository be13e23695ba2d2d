from .attention import DiffiTAttention, DiffiTAttnProcessor, DiffiTTransformerBlock
from .transformer_diffit import DIFFIT_CONFIGS, DiffiTTransformer2DModel

__all__ = [
    "DIFFIT_CONFIGS",
    "DiffiTAttention",
    "DiffiTAttnProcessor",
    "DiffiTTransformer2DModel",
    "DiffiTTransformerBlock",
]
