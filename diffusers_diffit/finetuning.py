"""Fine-tuning with other classes: which pretrained label-table row each new class starts from, and the re-shaped
table (`resize_class_embedding`), with the rule written out in its docstring."""

from collections.abc import Sequence

import torch
from torch import nn

from .labels import label_index, normalize_id2label
from .models.embeddings import DiffiTConditioningEmbedding


def default_class_map(
    class_names: Sequence[str] | None, pretrained_id2label: dict | None, pretrained_num_classes: int, num_classes: int
) -> list[int | None]:
    """Which pretrained class each new class starts from (None = a new class).

    By name when the pretrained model has `id2label` and the dataset has class names: new class i keeps the row of
    the pretrained class that has name i as one of its names or as its full description (case-insensitive, the
    pipeline's label rules); a name shared by several pretrained classes, or by none, makes a new class.
    Otherwise by id: new class i keeps pretrained row i when i < pretrained_num_classes.
    """
    if class_names is not None and pretrained_id2label:
        index = label_index(normalize_id2label(pretrained_id2label))
        matches = [index.get(str(name).strip().lower(), set()) for name in class_names]
        return [next(iter(ids)) if len(ids) == 1 else None for ids in matches]
    return [i if i < pretrained_num_classes else None for i in range(num_classes)]


def _conditioning_embedding(model: nn.Module) -> DiffiTConditioningEmbedding:
    found = [m for m in model.modules() if isinstance(m, DiffiTConditioningEmbedding)]
    if len(found) != 1:
        raise ValueError(f"`model` must hold exactly one DiffiTConditioningEmbedding, found {len(found)}.")
    return found[0]


def set_class_dropout_prob(model: nn.Module, class_dropout_prob: float) -> None:
    """Change the label-dropout probability of a DiffiT model (its config and its conditioning embedding)."""
    if not 0 <= class_dropout_prob < 1:
        raise ValueError(f"`class_dropout_prob` must be in [0, 1), got {class_dropout_prob}.")
    _conditioning_embedding(model).class_dropout_prob = class_dropout_prob
    model.register_to_config(class_dropout_prob=class_dropout_prob)


@torch.no_grad()
def resize_class_embedding(model: nn.Module, num_classes: int, class_map: Sequence[int | None] | None = None) -> None:
    """Re-shape a DiffiT model's label table in place for `num_classes` classes (0 = unconditional).

    The rule (the null class is always the last row, id = num_classes):
    - the pretrained null row moves to the new index `num_classes`;
    - new class i takes pretrained row `class_map[i]` (kept classes), or a copy of the pretrained null row when
      `class_map[i]` is None: a new class starts out as the unconditional model, so its samples begin as
      unconditional ones and classifier-free guidance starts neutral (ε_c = ε_u) rather than pointing somewhere
      arbitrary. `class_map=None` keeps classes by id (row i for i < the pretrained count);
    - from an unconditional model (no table) every row starts at 0, which is again the unconditional model;
    - to an unconditional model (`num_classes=0`) the table is dropped and the null row is folded into the bias of
      the timestep embedder's last layer, so the network computes exactly its pretrained unconditional function.
    Updates `model.config.num_classes`.
    """
    if num_classes < 0:
        raise ValueError(f"`num_classes` must be >= 0 (0 = unconditional), got {num_classes}.")
    embed = _conditioning_embedding(model)
    old_num, table = embed.num_classes, embed.class_embedder
    if class_map is None:
        class_map = [i if i < old_num else None for i in range(num_classes)]
    if len(class_map) != num_classes:
        raise ValueError(f"`class_map` must have one entry per new class ({num_classes}), got {len(class_map)}.")
    bad = [j for j in class_map if j is not None and not 0 <= j < old_num]
    if bad:
        raise ValueError(f"`class_map` entries must be None or pretrained ids in [0, {old_num}), got {bad}.")

    if num_classes == 0:
        if table is not None:
            embed.timestep_embedder.linear_2.bias += table.weight[old_num]
        embed.class_embedder = None
    else:
        dim = embed.timestep_embedder.linear_2.out_features
        ref = embed.timestep_embedder.linear_2.weight
        null = table.weight[old_num] if table is not None else ref.new_zeros(dim)
        rows = [table.weight[j] if j is not None else null for j in class_map] + [null]
        embed.class_embedder = nn.Embedding(num_classes + 1, dim, device=ref.device, dtype=ref.dtype)
        embed.class_embedder.weight.copy_(torch.stack(rows))
    embed.num_classes = num_classes
    model.register_to_config(num_classes=num_classes)
