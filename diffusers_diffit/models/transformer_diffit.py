"""DiffiTTransformer2DModel: the latent, class-conditional DiffiT released by NVIDIA (ImageNet 256 / 512)."""

import os

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import apply_lora_scale
from einops import rearrange
from torch import nn

from ..utils import check_class_labels, check_timestep
from .attention import DiffiTTransformerBlock
from .cache import TRANSFORMER_CACHES, check_cache_config
from .embeddings import DiffiTConditioningEmbedding
from .modeling_diffit import DiffiTModelMixin


class DiffiTTransformer2DModel(
    DiffiTModelMixin, ModelMixin, ConfigMixin, AttentionMixin, PeftAdapterMixin, CacheMixin
):
    """Latent DiffiT: patch embed + fixed sin-cos positions, N blocks of [LN → TMSA → +, LN → MLP → +] that all
    attend over the whole token grid with a relative-position bias, then LN → SiLU → Linear and unpatchify.

    Args:
        sample_size: latent side (32 for 256 px, 64 for 512 px); the bias tables are built for this grid.
        patch_size: side of the square patches.
        in_channels / out_channels: latent channels; `out_channels = 2 * in_channels` adds the learned-variance
            interpolation v after ε (the release).
        num_layers, num_attention_heads, attention_head_dim, mlp_ratio: transformer size (width = heads · head_dim).
        num_classes: number of classes; the null (unconditional) class is `num_classes`. 0 = unconditional model.
        class_dropout_prob: probability of replacing a label by the null class, in training mode only.
        frequency_embedding_size: width of the timestep sinusoid.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiffiTTransformerBlock"]
    _repeated_blocks = ["DiffiTTransformerBlock"]
    _skip_layerwise_casting_patterns = ["pos_embed", "norm", "condition_embed"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        out_channels: int | None = 8,
        num_layers: int = 28,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        frequency_embedding_size: int = 256,
    ):
        super().__init__()
        if sample_size % patch_size != 0:
            raise ValueError(f"`sample_size` {sample_size} must be divisible by `patch_size` {patch_size}.")
        if num_classes < 0:
            raise ValueError(f"`num_classes` must be >= 0 (0 = unconditional), got {num_classes}.")
        dim = num_attention_heads * attention_head_dim
        if dim % 4 != 0:
            raise ValueError(
                f"`num_attention_heads * attention_head_dim` = {dim} must be divisible by 4 (2-D sin-cos positions)."
            )
        self.out_channels = out_channels or in_channels
        grid = sample_size // patch_size

        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        # MAE's fixed table; base_size=grid keeps the positions 0…grid-1 (diffusers' default of 16 would rescale them)
        pos_embed = get_2d_sincos_pos_embed(dim, grid, base_size=grid).float()[None]  # [1, T, C]
        self.register_buffer("pos_embed", pos_embed, persistent=False)
        self.condition_embed = DiffiTConditioningEmbedding(
            dim, num_classes, class_dropout_prob, frequency_embedding_size
        )
        self.transformer_blocks = nn.ModuleList(
            DiffiTTransformerBlock(dim, num_attention_heads, attention_head_dim, window_size=grid, mlp_ratio=mlp_ratio)
            for _ in range(num_layers)
        )
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * self.out_channels)
        self.gradient_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self):
        """DiT-style init: Xavier-uniform linears, zero biases, N(0, 0.02) embeddings; bias tables keep their
        trunc-normal(0.02) init from `DiffiTAttention`."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.condition_embed.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.condition_embed.timestep_embedder.linear_2.weight, std=0.02)
        if self.condition_embed.class_embedder is not None:
            nn.init.normal_(self.condition_embed.class_embedder.weight, std=0.02)

    def check_inputs(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None,
        attention_kwargs: dict | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raise a `ValueError` naming the argument for bad input; return `timestep` and `class_labels` as [B]
        tensors (`class_labels` None = unconditional)."""
        cfg = self.config
        if attention_kwargs:  # "scale" was taken out by `apply_lora_scale`
            raise ValueError(
                f"`attention_kwargs` takes only 'scale' (of the LoRA layers), got keys {sorted(attention_kwargs)}."
            )
        if hidden_states.ndim != 4 or hidden_states.shape[1] != cfg.in_channels:
            raise ValueError(
                f"`hidden_states` must be [batch, {cfg.in_channels}, {cfg.sample_size}, {cfg.sample_size}], "
                f"got {tuple(hidden_states.shape)}."
            )
        batch, _, height, width = hidden_states.shape
        if height % cfg.patch_size or width % cfg.patch_size:
            raise ValueError(
                f"`hidden_states` height and width must be divisible by patch_size={cfg.patch_size}, "
                f"got {height}x{width}."
            )
        if (height, width) != (cfg.sample_size, cfg.sample_size):
            raise ValueError(
                f"`hidden_states` is {height}x{width} but this model's position bias tables were built for "
                f"{cfg.sample_size}x{cfg.sample_size} (config.sample_size)."
            )
        timestep = check_timestep(timestep, batch, hidden_states.device)
        return timestep, check_class_labels(class_labels, batch, cfg.num_classes, hidden_states.device)

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        attention_kwargs: dict | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """
        Args:
            hidden_states: noisy latents [B, in_channels, sample_size, sample_size].
            timestep: training timestep(s) (0…999): a number, a 0-d tensor, or [B].
            class_labels: int64 [B] in [0, num_classes] (num_classes = null class); None = unconditional.
            attention_kwargs: `{"scale": s}` multiplies the update of the LoRA adapters by s (PEFT); no other keys.
        Returns:
            `Transformer2DModelOutput` whose `sample` is [B, out_channels, H, W]: ε, then v when learned variance.
        """
        timestep, class_labels = self.check_inputs(hidden_states, timestep, class_labels, attention_kwargs)
        p = self.config.patch_size
        h, w = hidden_states.shape[-2] // p, hidden_states.shape[-1] // p

        # made contiguous: a transposed residual stream would make every later add and norm copy
        x = self.patch_embed(hidden_states).flatten(2).transpose(1, 2).contiguous()  # [B, T, C], T = h·w
        x = x + self.pos_embed.to(x.dtype)  # [B, T, C]
        c = self.condition_embed(timestep, class_labels, dtype=x.dtype)  # [B, C]
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, c)
            else:
                x = block(x, c)  # [B, T, C]
        x = self.proj_out(F.silu(self.norm_out(x)))  # [B, T, p·p·C_out]
        output = rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=p, q=p)  # [B, C_out, H, W]

        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)

    def enable_cache(self, config) -> None:
        """diffusers' `CacheMixin.enable_cache` for the caches that apply to DiffiT: `FirstBlockCacheConfig`,
        `MagCacheConfig`, `TaylorSeerCacheConfig`, `PyramidAttentionBroadcastConfig` (any other is a `ValueError`;
        see `diffusers_diffit.models.cache`). `DiffiTPipeline` sets the cache context of every forward and resets
        the caches at the end of each call."""
        check_cache_config(config, TRANSFORMER_CACHES, type(self).__name__)
        super().enable_cache(config)

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path: str | os.PathLike | dict, **config_overrides):
        """Load one of NVIDIA's released checkpoints (official key layout, `.safetensors` or `.pt/.pth`, local or
        `owner/repo/filename` on the Hub), or its state dict. A truncated safetensors file is a `ValueError`; so is a
        pickle that holds anything besides tensors (`torch.load(weights_only=True)` refuses it: unpickling it could
        run code): convert it to safetensors, or load it yourself if you trust it and pass the result.

        The configuration is inferred from the tensor shapes; `config_overrides` (e.g. `class_dropout_prob=0.0`)
        replace inferred values and are checked against the tensors. `torch_dtype=` casts after loading.
        """
        from ..loading import load_official_transformer

        return load_official_transformer(cls, pretrained_model_link_or_path, **config_overrides)
