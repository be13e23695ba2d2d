"""An independent, deliberately naive DiffiT in the official checkpoint layout, written from the paper's equations
(TMSA: q, k, v = x·W + x_t·W_t, softmax(q·kᵀ/√d + B)·v with a Swin relative-position bias B). Its `state_dict()` has
exactly the released key names, so tests use it as a numerical reference and a source of official-layout
checkpoints, and the benchmarks time it as the NVIDIA-layout baseline. Nothing here imports diffusers_diffit."""

import functools
import math

import numpy as np
import torch
from torch import nn


def sincos_pos_embed(dim: int, grid: int) -> np.ndarray:
    """MAE's 2-D sin-cos table, float64 numpy, [grid², dim]."""
    grid_h = np.arange(grid, dtype=np.float64)
    grid_w = np.arange(grid, dtype=np.float64)
    mesh = np.meshgrid(grid_w, grid_h)  # w varies fastest

    def one_d(d, positions):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", positions.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(dim // 2, mesh[0]), one_d(dim // 2, mesh[1])], axis=1)


@functools.lru_cache
def swin_index(w: int) -> torch.Tensor:
    """Relative-position index by explicit loops: ((Δrow + w-1)·(2w-1) + Δcol + w-1)."""
    n = w * w
    index = torch.empty(n, n, dtype=torch.long)
    for i in range(n):
        for j in range(n):
            d_row, d_col = i // w - j // w, i % w - j % w
            index[i, j] = (d_row + w - 1) * (2 * w - 1) + (d_col + w - 1)
    return index


def timestep_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class PatchEmbedProj(nn.Module):
    def __init__(self, in_ch, dim, p):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, p, p)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim, freq=256):
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes, dim):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)


class Attention(nn.Module):
    def __init__(self, dim, heads, window, with_index=True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.qkv_temb = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", swin_index(window).clone(), persistent=with_index)

    def forward(self, x, c):
        b, n, d = x.shape
        qkv = (self.qkv(x) + self.qkv_temb(c)[:, None]).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        scores = scores + bias.reshape(n, n, self.heads).permute(2, 0, 1)[None]
        out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, dim, heads, window, mlp_ratio, with_index):
        super().__init__()
        self.attn = Attention(dim, heads, window, with_index)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, c):
        ln = lambda h: nn.functional.layer_norm(h, h.shape[-1:], eps=1e-6)  # noqa: E731
        x = x + self.attn(ln(x), c)
        return x + self.mlp(ln(x))


class FinalLayer(nn.Module):
    def __init__(self, dim, p, out_ch):
        super().__init__()
        self.linear = nn.Linear(dim, p * p * out_ch)


class ReferenceDiffiT(nn.Module):
    """Official-layout latent DiffiT. `forward(x, t, y)`; y = num_classes is the null class."""

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        num_classes=1000,
        learn_sigma=True,
        with_index=True,
    ):
        super().__init__()
        self.p, self.in_ch = patch_size, in_channels
        self.out_ch = in_channels * 2 if learn_sigma else in_channels
        grid = input_size // patch_size
        self.x_embedder = PatchEmbedProj(in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        pos = torch.from_numpy(sincos_pos_embed(hidden_size, grid)).float()[None]
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        self.blocks = nn.ModuleList(Block(hidden_size, num_heads, grid, mlp_ratio, with_index) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_ch)

    def forward(self, x, t, y):
        n, _, h, w = x.shape
        tokens = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            tokens = block(tokens, c)
        tokens = nn.functional.layer_norm(tokens, tokens.shape[-1:], eps=1e-6)
        tokens = self.final_layer.linear(nn.functional.silu(tokens))
        gh, gw, p = h // self.p, w // self.p, self.p
        tokens = tokens.reshape(n, gh, gw, p, p, self.out_ch)
        return torch.einsum("nhwpqc->nchpwq", tokens).reshape(n, self.out_ch, gh * p, gw * p)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every trainable tensor non-trivial values (zero-init layers would hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * (0.5 / math.sqrt(max(param.shape[-1], 1))))
    return model
