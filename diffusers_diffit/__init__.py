"""DiffiT (Diffusion Vision Transformers, ECCV 2024) for Hugging Face diffusers."""

__version__ = "0.1.0"

from .configs import DIFFIT_CONFIGS, DIFFIT_UNET_CONFIGS, model_config
from .cpu_inference import compile_frozen, compile_int8_dynamic
from .embedded import embedded_model_path
from .guidance import GUIDANCE_SCHEDULES
from .labels import imagenet_id2label
from .models import (
    DiffiTAttention,
    DiffiTAttnProcessor,
    DiffiTInferenceAttnProcessor,
    DiffiTTransformer2DModel,
    DiffiTTransformerBlock,
    DiffiTUNet2DModel,
)
from .pipelines import OFFICIAL_RECIPES, DiffiTPipeline, official_scheduler
from .remote_code import install_diffusers_hooks
from .schedulers import EDMHeunScheduler


# `DiffusionPipeline.from_pretrained` finds DiffiTPipeline; DiffiT repos with remote code load this package's classes
install_diffusers_hooks([DiffiTPipeline], [DiffiTTransformer2DModel, DiffiTUNet2DModel, EDMHeunScheduler])

__all__ = [
    "DIFFIT_CONFIGS",
    "DIFFIT_UNET_CONFIGS",
    "GUIDANCE_SCHEDULES",
    "OFFICIAL_RECIPES",
    "DiffiTAttention",
    "DiffiTAttnProcessor",
    "DiffiTInferenceAttnProcessor",
    "DiffiTPipeline",
    "DiffiTTransformer2DModel",
    "DiffiTTransformerBlock",
    "DiffiTUNet2DModel",
    "EDMHeunScheduler",
    "compile_frozen",
    "compile_int8_dynamic",
    "embedded_model_path",
    "imagenet_id2label",
    "model_config",
    "official_scheduler",
]
