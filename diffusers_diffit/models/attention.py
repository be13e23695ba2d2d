"""Time-dependent multi-head self-attention (TMSA, DiffiT eq. 3-6) and the DiffiT transformer block.

The module owns the parameters (spatial and time projections, the relative-position bias table), the processor owns
the computation, and diffusers' `dispatch_attention_fn` owns the kernel:

    q = x_s W_qs + x_t W_qt,  k = x_s W_ks + x_t W_kt,  v = x_s W_vs + x_t W_vt
    TMSA(x_s, x_t) = softmax(q kᵀ / √d + B) v,  B = relative-position bias of a w×w window

x_t (one vector per sample) is broadcast over the tokens. The attention runs on windows of w×w tokens: the latent
model passes its whole token grid as one window, the image-space U-Net passes [B·num_windows, w², C] with the
windows of a sample stored next to each other, and the time token of each sample is repeated over its windows.
"""

import torch
from diffusers.models.attention import AttentionModuleMixin, FeedForward
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, dispatch_attention_fn
from torch import nn

from .embeddings import get_relative_position_index

# Kernels that accept an additive float bias. Flash kernels (flash-attn, torch's flash SDPA, sage, NPU, XLA) do not.
BIAS_CAPABLE_BACKENDS = (
    AttentionBackendName.NATIVE,
    AttentionBackendName._NATIVE_MATH,
    AttentionBackendName._NATIVE_EFFICIENT,
    AttentionBackendName._NATIVE_CUDNN,
    AttentionBackendName.FLEX,
    AttentionBackendName.XFORMERS,
)


def check_bias_capable_backend(backend: AttentionBackendName | str | None) -> AttentionBackendName:
    """Resolve `backend` (None = diffusers' active backend) and fail clearly if it cannot add the position bias."""
    if backend is None:
        backend, _ = _AttentionBackendRegistry.get_active_backend()
    backend = AttentionBackendName(backend)
    if backend not in BIAS_CAPABLE_BACKENDS:
        allowed = ", ".join(repr(b.value) for b in BIAS_CAPABLE_BACKENDS)
        raise ValueError(
            f"Attention backend {backend.value!r} cannot add DiffiT's relative-position bias (an additive float "
            f"mask). Use one of: {allowed}."
        )
    return backend


def _per_token(time_projection: torch.Tensor, windows: int) -> torch.Tensor:
    """[B, C] time projection -> [B·windows, 1, C], broadcast over the tokens of every window of a sample."""
    return time_projection.repeat_interleave(windows, dim=0)[:, None] if windows > 1 else time_projection[:, None]


class DiffiTAttnProcessor:
    """TMSA through `dispatch_attention_fn`, for fused and unfused projections and every bias-capable backend.

    The bias is gathered once per call as [1, heads, N, N] in the query dtype and broadcast over the batch.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn: "DiffiTAttention", hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # hidden_states: [B·nW, N, C] (nW windows per sample), temb: [B, C_t]
        batch, num_tokens, _ = hidden_states.shape
        if num_tokens != attn.window_size**2:
            raise ValueError(
                f"TMSA was built for windows of {attn.window_size}x{attn.window_size} = {attn.window_size**2} tokens, "
                f"got {num_tokens} tokens."
            )
        if batch % temb.shape[0] != 0:
            raise ValueError(f"`temb` batch {temb.shape[0]} does not divide the token batch {batch}.")
        backend = check_bias_capable_backend(self._attention_backend)

        windows = batch // temb.shape[0]
        if attn.fused_projections:
            qkv = attn.to_qkv(hidden_states) + _per_token(attn.to_qkv_time(temb), windows)
            query, key, value = qkv.chunk(3, dim=-1)
        else:
            query = attn.to_q(hidden_states) + _per_token(attn.to_q_time(temb), windows)
            key = attn.to_k(hidden_states) + _per_token(attn.to_k_time(temb), windows)
            value = attn.to_v(hidden_states) + _per_token(attn.to_v_time(temb), windows)

        query, key, value = (x.unflatten(-1, (attn.heads, attn.head_dim)) for x in (query, key, value))  # [B, N, H, D]
        bias = attn.relative_position_bias().to(query.dtype)  # [1, H, N, N]
        hidden_states = dispatch_attention_fn(
            query, key, value, attn_mask=bias, backend=backend, parallel_config=self._parallel_config
        )
        return attn.to_out(hidden_states.flatten(2).to(query.dtype))  # [B, N, C]


class DiffiTAttention(nn.Module, AttentionModuleMixin):
    """TMSA parameters: spatial q/k/v, time q/k/v (all with bias), output projection, relative-position bias table.

    `fuse_projections()` fuses the spatial projections into `to_qkv` and the time projections into `to_qkv_time`.
    """

    _default_processor_cls = DiffiTAttnProcessor
    _available_processors = [DiffiTAttnProcessor]

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

    def relative_position_bias(self) -> torch.Tensor:
        """The bias B of eq. 6 -> [1, heads, N, N]."""
        n = self.window_size**2
        # gathering along the table's transpose lands directly in the contiguous [H, N·N] layout the kernels want
        # (a gather to [N·N, H] followed by a permute costs several times more, and a strided mask slows SDPA)
        bias = self.relative_position_bias_table.t().index_select(1, self.relative_position_index.view(-1))
        return bias.view(1, self.heads, n, n)

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

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.processor(self, hidden_states, temb)


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

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # hidden_states: [B·nW, N, C], temb: [B, C_t]
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states), temb)
        return hidden_states + self.ff(self.norm2(hidden_states))
