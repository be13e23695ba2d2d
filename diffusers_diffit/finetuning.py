"""Fine-tuning with other classes: which pretrained label-table row each new class starts from, the re-shaped
table (`resize_class_embedding`), with the rule written out in its docstring, and the rows a LoRA fine-tune trains
and ships beside its adapter (`train_class_rows`, `class_rows_state_dict`, `load_class_rows`)."""

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


def class_table(model: nn.Module) -> tuple[str, DiffiTConditioningEmbedding]:
    """(state-dict prefix of the label table, the conditioning embedding); a table is required."""
    embed = _conditioning_embedding(model)
    if embed.class_embedder is None:
        raise ValueError("The model is unconditional (`num_classes=0`): it has no label table.")
    name = next(n for n, m in model.named_modules() if m is embed)
    return f"{name}.class_embedder", embed


def train_class_rows(model: nn.Module, rows: Sequence[int]) -> torch.utils.hooks.RemovableHandle:
    """Make the label table trainable in the given rows only (e.g. the new classes of a LoRA fine-tune): the other
    rows, the null class among them, get zero gradients, so an optimizer without weight decay leaves them exactly
    as they are. Returns the gradient hook's handle. The null row (`num_classes`) cannot be trained this way: it is
    the unconditional model every class is guided against."""
    _, embed = class_table(model)
    rows = sorted(set(rows))
    bad = [r for r in rows if not 0 <= r < embed.num_classes]
    if bad:
        raise ValueError(
            f"`rows` must be class ids in [0, {embed.num_classes}); {bad} would overwrite the null class "
            f"(id {embed.num_classes}) or lie outside the table."
        )
    mask = torch.zeros(embed.num_classes + 1, 1, dtype=torch.bool, device=embed.class_embedder.weight.device)
    mask[rows] = True
    embed.class_embedder.weight.requires_grad_(True)
    return embed.class_embedder.weight.register_hook(lambda grad: grad * mask)


def class_rows_state_dict(model: nn.Module, initial_table: torch.Tensor) -> dict[str, torch.Tensor]:
    """The label-table rows that differ from `initial_table` (the table as `resize_class_embedding` left it before
    training), as the tensors saved beside a LoRA adapter: `<table>.class_rows` [K, D], `<table>.class_row_ids` [K]
    and `<table>.num_classes` (0-d). `load_class_rows` rebuilds the table from the base model and these."""
    prefix, embed = class_table(model)
    table = embed.class_embedder.weight.detach()
    if table.shape != initial_table.shape:
        raise ValueError(f"`initial_table` is {tuple(initial_table.shape)}, the model's table {tuple(table.shape)}.")
    ids = (table != initial_table.to(table)).any(dim=1).nonzero().flatten()
    if embed.num_classes in ids:
        raise ValueError(
            f"The null class row (id {embed.num_classes}) changed in training: the fine-tune overwrote the "
            "unconditional model. Train new rows with `train_class_rows`, which keeps it."
        )
    return {
        f"{prefix}.class_rows": table[ids].clone(),
        f"{prefix}.class_row_ids": ids.cpu(),
        f"{prefix}.num_classes": torch.tensor(embed.num_classes),
    }


@torch.no_grad()
def load_class_rows(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Grow the label table to the saved `num_classes` by `resize_class_embedding`'s rule (classes kept by id, the
    null row moved to the new last index) and write the saved rows into it (the inverse of `class_rows_state_dict`).
    `state_dict` holds exactly the three tensors; a saved table smaller than the model's, or a row that would
    overwrite the null class, raises a ValueError."""
    prefix, embed = class_table(model)
    expected = {f"{prefix}.{k}" for k in ("class_rows", "class_row_ids", "num_classes")}
    if set(state_dict) != expected:
        raise ValueError(f"Class rows must be the tensors {sorted(expected)}, got {sorted(state_dict)}.")
    rows, ids = state_dict[f"{prefix}.class_rows"], state_dict[f"{prefix}.class_row_ids"].long()
    num_classes = int(state_dict[f"{prefix}.num_classes"])
    if num_classes < embed.num_classes:
        raise ValueError(
            f"The class rows are for {num_classes} classes, fewer than the model's {embed.num_classes}: they were "
            "trained from another base model."
        )
    dim = embed.class_embedder.embedding_dim
    if rows.ndim != 2 or rows.shape != (len(ids), dim):
        raise ValueError(f"`class_rows` must be [{len(ids)}, {dim}] for this model, got {tuple(rows.shape)}.")
    bad = [int(i) for i in ids if not 0 <= i < num_classes]
    if bad:
        raise ValueError(
            f"`class_row_ids` {bad} would overwrite the null class (id {num_classes}) or lie outside the table; "
            f"allowed: class ids in [0, {num_classes})."
        )
    if num_classes > embed.num_classes:
        resize_class_embedding(model, num_classes)
    weight = embed.class_embedder.weight
    weight[ids.to(weight.device)] = rows.to(weight)
