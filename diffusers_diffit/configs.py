"""Named model configurations, all in one table: name -> (model class, config).

- The paper's models: NVIDIA's released latent DiffiT-XL/2 (ImageNet 256 and 512; only the latent side differs) and
  the image-space U-Nets of CIFAR-10 and FFHQ-64, whose dropout is EDM's DDPM++ value for each dataset (DiffiT trains
  with the EDM recipe and does not state its own).
- The digits benchmark (`diffusers_diffit.data.digits`): the shipped `DiffiT-digits` U-Net (758,453 parameters), its
  baseline `UNet2D-digits` (diffusers' `UNet2DModel` of about the same size: 729,569) and the shipped latent model
  `DiffiT-digits-latent` (learned variance, one token per pixel of the digits VAE's 4×4×4 latents).
- Tiny models that tests and smoke runs build in milliseconds.

`model_config(name)` looks a name up; `DIFFIT_CONFIGS` and `DIFFIT_UNET_CONFIGS` (exported by the package) are the
paper's models by class.
"""

from diffusers import UNet2DModel
from diffusers.models.modeling_utils import ModelMixin

from .data.digits import NUM_CLASSES as DIGITS_CLASSES
from .data.digits import RESOLUTION as DIGITS_RESOLUTION
from .models import DiffiTTransformer2DModel, DiffiTUNet2DModel


DIFFIT_XL_2 = dict(
    patch_size=2,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    num_attention_heads=16,
    attention_head_dim=72,
    mlp_ratio=4.0,
    num_classes=1000,
    class_dropout_prob=0.1,
)
# A latent DiffiT with learned variance on 8×8 latents (the tests' tiny VAE: 16-px images), 10 classes
TINY_TRANSFORMER = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    out_channels=8,
    num_layers=2,
    num_attention_heads=2,
    attention_head_dim=8,
    num_classes=10,
)

MODEL_CONFIGS: dict[str, tuple[type[ModelMixin], dict]] = {
    "DiffiT-XL/2-256": (DiffiTTransformer2DModel, dict(DIFFIT_XL_2, sample_size=32)),
    "DiffiT-XL/2-512": (DiffiTTransformer2DModel, dict(DIFFIT_XL_2, sample_size=64)),
    "DiffiT-CIFAR10": (
        DiffiTUNet2DModel,
        dict(
            sample_size=32,
            in_channels=3,
            block_out_channels=(128, 256, 256),
            layers_per_block=4,
            window_size=4,
            attention_head_dim=32,
            time_embedding_dim=512,
            num_classes=0,
            dropout=0.13,
        ),
    ),
    "DiffiT-FFHQ64": (
        DiffiTUNet2DModel,
        dict(
            sample_size=64,
            in_channels=3,
            block_out_channels=(128, 256, 256, 256),
            layers_per_block=4,
            window_size=8,
            attention_head_dim=32,
            time_embedding_dim=512,
            num_classes=0,
            dropout=0.05,
        ),
    ),
    "DiffiT-digits": (
        DiffiTUNet2DModel,
        dict(
            sample_size=DIGITS_RESOLUTION,
            in_channels=1,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            window_size=4,
            attention_head_dim=16,
            time_embedding_dim=128,
            frequency_embedding_size=64,
            num_classes=DIGITS_CLASSES,
            class_dropout_prob=0.0,
        ),
    ),
    "UNet2D-digits": (
        UNet2DModel,
        dict(
            sample_size=DIGITS_RESOLUTION,
            in_channels=1,
            out_channels=1,
            block_out_channels=(32, 48, 48),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=16,
            norm_num_groups=8,
            num_class_embeds=DIGITS_CLASSES + 1,  # the last row is the null class of classifier-free guidance
        ),
    ),
    "DiffiT-digits-latent": (
        DiffiTTransformer2DModel,
        dict(
            sample_size=4,
            patch_size=1,
            in_channels=4,
            out_channels=8,
            num_layers=5,
            num_attention_heads=4,
            attention_head_dim=32,
            mlp_ratio=4.0,
            num_classes=DIGITS_CLASSES,
            class_dropout_prob=0.0,
        ),
    ),
    "tiny-transformer": (DiffiTTransformer2DModel, TINY_TRANSFORMER),
    # 16×16 latents (an 8×8 token grid), wider heads
    "tiny-transformer-16": (
        DiffiTTransformer2DModel,
        dict(TINY_TRANSFORMER, sample_size=16, num_attention_heads=4, attention_head_dim=16),
    ),
    # 16-px one-channel images: three levels (16, 8, 4), windowed attention at 16 and 8, global at 4
    "tiny-unet": (
        DiffiTUNet2DModel,
        dict(
            sample_size=16,
            in_channels=1,
            block_out_channels=(16, 32, 32),
            layers_per_block=1,
            window_size=4,
            attention_head_dim=8,
            time_embedding_dim=24,
            frequency_embedding_size=16,
            num_classes=10,
        ),
    ),
}

DIFFIT_CONFIGS = {name: MODEL_CONFIGS[name][1] for name in ("DiffiT-XL/2-256", "DiffiT-XL/2-512")}
DIFFIT_UNET_CONFIGS = {name: MODEL_CONFIGS[name][1] for name in ("DiffiT-CIFAR10", "DiffiT-FFHQ64")}


def model_config(name: str) -> tuple[type[ModelMixin], dict]:
    """(model class, a copy of its config) of a named configuration: `cls(**config)` builds the model."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"`name` {name!r} is not a named model configuration; allowed: {sorted(MODEL_CONFIGS)}.")
    model_class, config = MODEL_CONFIGS[name]
    return model_class, dict(config)
