"""Embeddings shared by the DiffiT models: the relative-position index of a window, and the one time + class
conditioning vector (the "time token" x_t of TMSA)."""

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn


def get_relative_position_index(window_size: int) -> torch.Tensor:
    """Swin's relative-position index of a `window_size`² window -> int64 [N, N], values in [0, (2w-1)²)."""
    w = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)  # [2, N]
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)  # [N, N, 2], in [0, 2w-2]
    return relative[..., 0] * (2 * w - 1) + relative[..., 1]


class DiffiTConditioningEmbedding(nn.Module):
    """c = TimestepEmbedder(t) + LabelEmbedder(y), shared by every block.

    The timestep sinusoid is [cos, sin] with frequencies exp(-ln(10000)·i/half) (diffusers' `Timesteps` with
    `downscale_freq_shift=0`; the `1` used by diffusers' DiT embedder does not match the release). The label table
    has one extra row, the null class `num_classes`, used for classifier-free guidance; `num_classes=0` gives an
    unconditional model without a label table.
    """

    def __init__(self, embedding_dim: int, num_classes: int, class_dropout_prob: float, frequency_dim: int = 256):
        super().__init__()
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.time_proj = Timesteps(frequency_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(frequency_dim, embedding_dim)
        self.class_embedder = nn.Embedding(num_classes + 1, embedding_dim) if num_classes > 0 else None

    def forward(self, timestep: torch.Tensor, class_labels: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        # timestep: [B] float or int; class_labels: [B] int64 or None -> [B, D]
        emb = self.timestep_embedder(self.time_proj(timestep).to(dtype))
        if self.class_embedder is None:
            return emb
        if class_labels is None:
            class_labels = torch.full_like(timestep, self.num_classes, dtype=torch.long)
        elif self.training and self.class_dropout_prob > 0:
            drop = torch.rand(class_labels.shape, device=class_labels.device) < self.class_dropout_prob
            class_labels = torch.where(drop, self.num_classes, class_labels)
        return emb + self.class_embedder(class_labels)
