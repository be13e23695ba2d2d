"""DiffiTUNet2DModel: the image-space DiffiT (CIFAR-10, FFHQ-64): a U-shaped encoder-decoder of DiffiT ResBlocks.

    DiffiT ResBlock (eq. 9-10):  x̂ = Conv3×3(SiLU(GN(x)));  x = DiffiTBlock(x̂, c) + x

where DiffiTBlock is the transformer block of the latent model (TMSA + MLP, `DiffiTTransformerBlock`) applied on
non-overlapping w×w windows of x̂, with the same conditioning token c broadcast to every window. Windows are fixed at
construction from `sample_size`: a level whose feature map is no larger than `window_size` uses the whole map as
its one window (global attention); every block has its own relative-position bias table.

The network is the raw EDM denoiser F_θ: it is called with c_in·x and c_noise = ln(σ)/4 as the timestep, and EDM's
c_skip / c_out are applied outside (`diffusers_diffit.edm`, `EDMHeunScheduler`, diffusers' EDM schedulers).
"""

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.downsampling import Downsample2D
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.models.upsampling import Upsample2D
from diffusers.utils import apply_lora_scale
from einops import rearrange
from torch import nn

from ..utils import check_class_labels, check_timestep
from .attention import DiffiTTransformerBlock
from .cache import check_cache_config
from .embeddings import DiffiTConditioningEmbedding
from .modeling_diffit import DiffiTModelMixin


def group_norm(channels: int, max_groups: int) -> nn.GroupNorm:
    """GroupNorm with `max_groups` groups, fewer when that would leave under 4 channels per group."""
    groups = max(min(max_groups, channels // 4), 1)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


class DiffiTResBlock(nn.Module):
    """x̂ = Conv3×3(Dropout(SiLU(GN(x)))); out = DiffiTBlock(x̂ on w×w windows, c) + shortcut(x).

    The shortcut is the identity, or a 1×1 conv when the block changes the channel count.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        window_size: int,
        attention_head_dim: int,
        time_embed_dim: int,
        mlp_ratio: float,
        dropout: float,
        norm_num_groups: int,
    ):
        super().__init__()
        self.window_size = window_size
        self.norm = group_norm(in_channels, norm_num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.transformer = DiffiTTransformerBlock(
            out_channels,
            num_attention_heads=out_channels // attention_head_dim,
            attention_head_dim=attention_head_dim,
            window_size=window_size,
            time_embed_dim=time_embed_dim,
            mlp_ratio=mlp_ratio,
        )
        self.conv_shortcut = None
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # hidden_states: [B, C_in, H, W], temb: [B, C_t] -> [B, C_out, H, W]
        p = self.window_size
        h, w = hidden_states.shape[-2] // p, hidden_states.shape[-1] // p  # windows per column, per row
        x = self.conv(self.dropout(F.silu(self.norm(hidden_states))))  # [B, C_out, H, W]
        # non-overlapping p×p windows, row-major, the windows of a sample adjacent: [B·nW, p², C_out], nW = h·w
        x = rearrange(x, "b c (h p) (w q) -> (b h w) (p q) c", p=p, q=p)
        x = self.transformer(x, temb, num_windows=h * w)
        x = rearrange(x, "(b h w) (p q) c -> b c (h p) (w q)", h=h, w=w, p=p)  # [B, C_out, H, W]
        shortcut = hidden_states if self.conv_shortcut is None else self.conv_shortcut(hidden_states)
        return x + shortcut


class DiffiTUNet2DModel(DiffiTModelMixin, ModelMixin, ConfigMixin, AttentionMixin, PeftAdapterMixin, CacheMixin):
    """Image-space DiffiT: conv tokenizer, `len(block_out_channels)` levels of `layers_per_block` DiffiT ResBlocks
    down (conv stride-2 downsampling between levels) and the same number up (nearest ×2 + conv upsampling), each
    decoder block taking the matching encoder block's output concatenated to its input, then GN → SiLU → Conv3×3.

    Args:
        sample_size: image side the windows are planned for; level l works on `sample_size / 2**l`.
        in_channels / out_channels: image channels (`out_channels=None` = `in_channels`).
        block_out_channels: feature width of each level, finest first.
        layers_per_block: DiffiT ResBlocks per level in the encoder, and again in the decoder.
        window_size: TMSA window side; a level whose map side is at most this attends over the whole map.
        attention_head_dim: channels per attention head (heads = width / head_dim).
        mlp_ratio: hidden width of the transformer MLP relative to the level width.
        time_embedding_dim: width of the shared time (+ class) token.
        frequency_embedding_size: width of the sinusoidal embedding of the timestep (EDM: c_noise = ln(σ)/4).
        num_classes: number of classes; the null (unconditional) class is `num_classes`. 0 = unconditional model.
        class_dropout_prob: probability of replacing a label by the null class, in training mode only.
        dropout: dropout before each ResBlock's 3×3 conv.
        norm_num_groups: GroupNorm groups (fewer when a level has under 4 channels per group).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiffiTResBlock"]
    _repeated_blocks = ["DiffiTResBlock"]
    _skip_layerwise_casting_patterns = ["condition_embed", "norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        block_out_channels: tuple[int, ...] = (128, 256, 256),
        layers_per_block: int = 4,
        window_size: int = 4,
        attention_head_dim: int = 32,
        mlp_ratio: float = 4.0,
        time_embedding_dim: int = 512,
        frequency_embedding_size: int = 256,
        num_classes: int = 0,
        class_dropout_prob: float = 0.1,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"`num_classes` must be >= 0 (0 = unconditional), got {num_classes}.")
        if window_size < 1:
            raise ValueError(f"`window_size` must be >= 1, got {window_size}.")
        if layers_per_block < 1:
            raise ValueError(f"`layers_per_block` must be >= 1, got {layers_per_block}.")
        if mlp_ratio <= 0:
            raise ValueError(f"`mlp_ratio` must be > 0, got {mlp_ratio}.")
        if time_embedding_dim < 1:
            raise ValueError(f"`time_embedding_dim` must be >= 1, got {time_embedding_dim}.")
        if any(c % attention_head_dim for c in block_out_channels):
            raise ValueError(
                f"Every entry of `block_out_channels` {tuple(block_out_channels)} must be a multiple of "
                f"`attention_head_dim` {attention_head_dim}."
            )
        self.window_sizes = self._plan_windows(sample_size, len(block_out_channels), window_size)
        self.out_channels = out_channels or in_channels
        block = dict(
            attention_head_dim=attention_head_dim,
            time_embed_dim=time_embedding_dim,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            norm_num_groups=norm_num_groups,
        )

        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.condition_embed = DiffiTConditioningEmbedding(
            time_embedding_dim, num_classes, class_dropout_prob, frequency_embedding_size
        )

        channels, skip_channels = block_out_channels[0], []
        self.down_blocks, self.downsamplers = nn.ModuleList(), nn.ModuleList()
        for level, (width, window) in enumerate(zip(block_out_channels, self.window_sizes)):
            if level > 0:
                self.downsamplers.append(Downsample2D(channels, use_conv=True, padding=1, name="op"))
            resblocks = nn.ModuleList()
            for _ in range(layers_per_block):
                resblocks.append(DiffiTResBlock(channels, width, window, **block))
                channels = width
                skip_channels.append(width)
            self.down_blocks.append(resblocks)

        self.up_blocks, self.upsamplers = nn.ModuleList(), nn.ModuleList()
        for level, (width, window) in enumerate(zip(block_out_channels[::-1], self.window_sizes[::-1])):
            if level > 0:
                self.upsamplers.append(Upsample2D(channels, use_conv=True))
            resblocks = nn.ModuleList()
            for _ in range(layers_per_block):
                resblocks.append(DiffiTResBlock(channels + skip_channels.pop(), width, window, **block))
                channels = width
            self.up_blocks.append(resblocks)

        self.norm_out = group_norm(channels, norm_num_groups)
        self.conv_out = nn.Conv2d(channels, self.out_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.gradient_checkpointing = False

    @staticmethod
    def _plan_windows(sample_size: int, num_levels: int, window_size: int) -> list[int]:
        """Window side per level: `window_size`, or the whole map where the map is no larger."""
        windows = []
        for level in range(num_levels):
            side = sample_size / 2**level
            window = min(window_size, int(side))
            if side < 1 or side != int(side) or side % window:
                raise ValueError(
                    f"`sample_size` {sample_size} gives a {side:g}-pixel map at level {level}, which must be an "
                    f"integer multiple of the window ({window}); use a `sample_size` divisible by "
                    f"{2 ** (num_levels - 1) * window_size} or change `window_size` {window_size}."
                )
            windows.append(window)
        return windows

    def check_inputs(
        self, sample: torch.Tensor, timestep: torch.Tensor | float | int, class_labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raise a `ValueError` naming the argument for bad input; return `timestep` and `class_labels` as [B]
        tensors (`class_labels` None = unconditional)."""
        cfg = self.config
        if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(
                f"`sample` must be [batch, {cfg.in_channels}, height, width], got shape {tuple(sample.shape)}."
            )
        multiple = math.lcm(*(2**level * window for level, window in enumerate(self.window_sizes)))
        height, width = sample.shape[-2:]
        if height % multiple or width % multiple:
            raise ValueError(
                f"`sample` height and width must be multiples of {multiple} (the window of every level: "
                f"{self.window_sizes}, planned for sample_size={cfg.sample_size}), got {height}x{width}."
            )
        batch = sample.shape[0]
        timestep = check_timestep(timestep, batch, sample.device)
        return timestep, check_class_labels(class_labels, batch, cfg.num_classes, sample.device)

    def enable_cache(self, config) -> None:
        """No diffusers cache applies to the U-Net (no flat list of blocks whose residual a cache could reuse; see
        `diffusers_diffit.models.cache`): always a `ValueError`. `CacheMixin` is mixed in so that pipelines can set
        cache contexts on either DiffiT model."""
        check_cache_config(config, (), type(self).__name__)

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        attention_kwargs: dict | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple[torch.Tensor]:
        """
        Args:
            sample: [B, in_channels, H, W]; H and W multiples of every level's window (`sample_size` always is).
            timestep: noise level fed to the time embedding (EDM: c_noise = ln(σ)/4): a number, 0-d tensor or [B].
            class_labels: int64 [B] in [0, num_classes] (num_classes = null class); None = unconditional.
            attention_kwargs: `{"scale": s}` multiplies the update of the LoRA adapters by s (PEFT); no other keys.
        Returns:
            `UNet2DOutput` whose `sample` is [B, out_channels, H, W] (the raw network output F_θ).
        """
        if attention_kwargs:  # "scale" was taken out by `apply_lora_scale`
            raise ValueError(
                f"`attention_kwargs` takes only 'scale' (of the LoRA layers), got keys {sorted(attention_kwargs)}."
            )
        timestep, class_labels = self.check_inputs(sample, timestep, class_labels)

        h = self.conv_in(sample)  # [B, C_0, H, W]
        c = self.condition_embed(timestep, class_labels, dtype=h.dtype)  # [B, C_t]
        skips = []
        for level, resblocks in enumerate(self.down_blocks):
            if level > 0:
                h = self.downsamplers[level - 1](h)  # stride-2 conv: [B, C, H / 2^level, W / 2^level]
            for resblock in resblocks:
                h = self._run(resblock, h, c)  # [B, block_out_channels[level], H / 2^level, W / 2^level]
                skips.append(h)
        for level, resblocks in enumerate(self.up_blocks):
            if level > 0:
                h = self.upsamplers[level - 1](h)  # nearest ×2 + conv: H and W doubled
            for resblock in resblocks:
                h = self._run(resblock, torch.cat([h, skips.pop()], dim=1), c)  # the matching skip on channels
        output = self.conv_out(F.silu(self.norm_out(h)))  # [B, C_out, H, W]

        if not return_dict:
            return (output,)
        return UNet2DOutput(sample=output)

    def _run(self, resblock: DiffiTResBlock, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(resblock, h, c)
        return resblock(h, c)
