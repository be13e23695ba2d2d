from .attention import DiffiTAttention, DiffiTTransformerBlock
from .attention_processor import DiffiTAttnProcessor, DiffiTInferenceAttnProcessor
from .transformer_diffit import DiffiTTransformer2DModel
from .unet_diffit import DiffiTResBlock, DiffiTUNet2DModel


__all__ = [
    "DiffiTAttention",
    "DiffiTAttnProcessor",
    "DiffiTInferenceAttnProcessor",
    "DiffiTResBlock",
    "DiffiTTransformer2DModel",
    "DiffiTTransformerBlock",
    "DiffiTUNet2DModel",
]
