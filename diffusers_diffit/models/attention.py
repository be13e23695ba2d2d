"""Time-dependent multi-head self-attention (TMSA, DiffiT eq. 3-6) and the DiffiT transformer block.

The module owns the parameters (spatial and time projections, the relative-position bias table), the processor owns
the computation (`attention_processor.py`), and diffusers' `dispatch_attention_fn` owns the kernel:

    q = x_s W_qs + x_t W_qt,  k = x_s W_ks + x_t W_kt,  v = x_s W_vs + x_t W_vt
    TMSA(x_s, x_t) = softmax(q kᵀ / √d + B) v,  B = relative-position bias of a w×w window

x_t (one vector per sample) is broadcast over the tokens. The attention runs on windows of w×w tokens: the latent
model passes its whole token grid as one window, the image-space U-Net passes [B·num_windows, w², C] with the
windows of a sample stored next to each other, and the time token of each sample is broadcast over its windows.
"""

import torch
from diffusers.models.attention import AttentionModuleMixin, FeedForward
from torch import nn

from .attention_processor import DiffiTAttnProcessor, DiffiTInferenceAttnProcessor
from .embeddings import get_relative_position_index


class DiffiTAttention(nn.Module, AttentionModuleMixin):
    """TMSA parameters: spatial q/k/v, time q/k/v (all with bias), output projection, relative-position bias table.

    `fuse_projections()` fuses the spatial projections into `to_qkv` and the time projections into `to_qkv_time`.
    """

    _default_processor_cls = DiffiTAttnProcessor
    _available_processors = [DiffiTAttnProcessor, DiffiTInferenceAttnProcessor]

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        window_size: int,
        time_embed_dim: int | None = None,
        processor: DiffiTAttnProcessor | None = None,
    ):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        self.window_size = window_size
        self.use_bias = True
        inner_dim = heads * head_dim
        time_embed_dim = time_embed_dim or dim

        self.to_q = nn.Linear(dim, inner_dim)
        self.to_k = nn.Linear(dim, inner_dim)
        self.to_v = nn.Linear(dim, inner_dim)
        self.to_q_time = nn.Linear(time_embed_dim, inner_dim)
        self.to_k_time = nn.Linear(time_embed_dim, inner_dim)
        self.to_v_time = nn.Linear(time_embed_dim, inner_dim)
        self.to_out = nn.Linear(inner_dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", get_relative_position_index(window_size), persistent=False)

        self.set_processor(processor or self._default_processor_cls())

    def relative_position_bias(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The bias B of eq. 6 -> [1, heads, N, N] in `dtype` (default: the table's)."""
        n = self.window_size**2
        # gathering along the table's transpose lands directly in the contiguous [H, N·N] layout the kernels want
        # (a gather to [N·N, H] followed by a permute costs several times more, and a strided mask slows SDPA)
        bias = self.relative_position_bias_table.t().index_select(1, self.relative_position_index.view(-1))
        return bias.view(1, self.heads, n, n).to(dtype or self.relative_position_bias_table.dtype)

    @torch.no_grad()
    def fuse_projections(self):
        if self.fused_projections:
            return
        for suffix in ("", "_time"):
            parts = [getattr(self, f"to_{name}{suffix}") for name in "qkv"]
            fused = nn.Linear(parts[0].in_features, 3 * parts[0].out_features)
            fused.to(device=parts[0].weight.device, dtype=parts[0].weight.dtype)
            fused.weight.copy_(torch.cat([p.weight for p in parts]))
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
            setattr(self, f"to_qkv{suffix}", fused)
        self.fused_projections = True

    @torch.no_grad()
    def unfuse_projections(self):
        if not self.fused_projections:
            return
        del self.to_qkv, self.to_qkv_time
        self.fused_projections = False

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, num_windows: int = 1) -> torch.Tensor:
        return self.processor(self, hidden_states, temb, num_windows=num_windows)


class DiffiTTransformerBlock(nn.Module):
    """x = x + TMSA(LN(x), c); x = x + MLP(LN(x)). LayerNorms without affine, eps 1e-6; tanh-GELU MLP."""

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        window_size: int,
        time_embed_dim: int | None = None,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = DiffiTAttention(dim, num_attention_heads, attention_head_dim, window_size, time_embed_dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, inner_dim=int(dim * mlp_ratio), activation_fn="gelu-approximate")

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, num_windows: int = 1) -> torch.Tensor:
        # hidden_states: [B·nW, N, C], the nW = num_windows windows of each sample adjacent; temb: [B, C_t]
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states), temb, num_windows)
        # the MLP runs through the attention processor too, so that an alternative processor changes its kernels
        return hidden_states + self.attn.processor.feed_forward(self.ff, self.norm2(hidden_states))
