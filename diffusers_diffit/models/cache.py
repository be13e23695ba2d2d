"""diffusers' cache hooks (`CacheMixin.enable_cache`) on DiffiT: which apply to which model, and the block metadata
they need.

`DiffiTTransformer2DModel` is a flat stack of `DiffiTTransformerBlock`s, each returning its hidden states alone, so
the block-level caches apply: FirstBlockCache, MagCache and TaylorSeer, and PyramidAttentionBroadcast on the blocks'
TMSA modules. The others do not fit DiffiT: FasterCache approximates an unconditional half that it expects *first*
in the batch and splits inputs by names DiffiT's forward does not take; SeaCache needs a model-specific raw-input
callback; TextKVCache caches text-encoder states DiffiT has none of. `DiffiTUNet2DModel` is a U-shaped stack of
ResBlocks joined by skip connections, with no flat list of blocks whose residual a cache could reuse: no cache
applies to it.
"""

import json
from pathlib import Path

from diffusers.hooks import (
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

from ..embedded import embedded_model_path
from .attention import DiffiTTransformerBlock


TRANSFORMER_CACHES = (FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig, PyramidAttentionBroadcastConfig)


def check_cache_config(config, supported: tuple, model_name: str) -> None:
    """Raise a `ValueError` naming `config`'s class and the cache configs `model_name` supports."""
    if not isinstance(config, supported):
        allowed = ", ".join(c.__name__ for c in supported) or "none"
        raise ValueError(
            f"`config` {type(config).__name__} does not apply to {model_name}; cache configs that do: {allowed} "
            "(see diffusers_diffit.models.cache for why)."
        )
    if supported:
        register_diffit_block()


def register_diffit_block() -> None:
    """Tell diffusers' block hooks (the block caches, SkipLayerGuidance's layer skip) what DiffiT's block returns:
    its hidden states alone. Done on first use: diffusers' registry imports its own models when first touched."""
    TransformerBlockRegistry.register(DiffiTTransformerBlock, TransformerBlockMetadata(return_hidden_states_index=0))


def shipped_mag_ratios(model: str, recipe: str = "saved") -> list[float]:
    """MagCache's magnitude ratios shipped for the embedded model `model` (`diffusers_diffit.embedded`) under
    `recipe`: "saved" (the folder's scheduler and step count) or "official" (`official_scheduler()`, 250 steps);
    pass them as `MagCacheConfig(mag_ratios=..., num_inference_steps=len(ratios))`. Measured by
    `python -m benchmarks.cache_study calibrate`, which also calibrates a user's own model."""
    path = Path(embedded_model_path(model)) / "magcache.json"
    if not path.is_file():
        raise ValueError(f"`model` {model!r} has no shipped MagCache ratios; calibrate them (see {__name__}).")
    shipped = json.loads(path.read_text())
    if recipe not in shipped:
        raise ValueError(f"`recipe` must be one of {sorted(shipped)} for {model!r}, got {recipe!r}.")
    return shipped[recipe]["mag_ratios"]
