"""Fine-tuning with other classes: the label-table rule of diffusers_diffit/finetuning.py."""

import pytest
import torch

from diffusers_diffit import DiffiTTransformer2DModel
from diffusers_diffit.finetuning import default_class_map, resize_class_embedding
from tests.utils import tiny_transformer


def _eps(model, x, t, labels):
    return model(x, t, class_labels=labels).sample


@torch.no_grad()
def test_resize_class_embedding_keeps_rows_moves_null_and_starts_new_classes_unconditional():
    torch.manual_seed(0)
    model = tiny_transformer(num_classes=5).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    before = {y: _eps(model, x, t, torch.tensor([y, y])) for y in range(6)}  # 5 = null
    old_table = model.condition_embed.class_embedder.weight.clone()

    resize_class_embedding(model, 7, class_map=[3, None, 0, None, None, 4, 1])
    table = model.condition_embed.class_embedder.weight
    assert table.shape == (8, old_table.shape[1]) and model.config.num_classes == 7
    for new, old in {0: 3, 2: 0, 5: 4, 6: 1, 1: 5, 3: 5, 4: 5, 7: 5}.items():  # new classes & null <- old null row
        torch.testing.assert_close(table[new], old_table[old], rtol=0, atol=0)
    torch.testing.assert_close(_eps(model, x, t, torch.tensor([0, 0])), before[3])
    torch.testing.assert_close(_eps(model, x, t, torch.tensor([1, 1])), before[5])  # new class = old unconditional
    torch.testing.assert_close(_eps(model, x, t, None), before[5])  # null class


@torch.no_grad()
def test_resize_to_unconditional_preserves_the_unconditional_function(tmp_path):
    torch.manual_seed(0)
    model = tiny_transformer(num_classes=5).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 999])
    expected = _eps(model, x, t, None)
    resize_class_embedding(model, 0)
    assert model.condition_embed.class_embedder is None and model.config.num_classes == 0
    torch.testing.assert_close(_eps(model, x, t, None), expected, rtol=1e-5, atol=1e-6)
    model.save_pretrained(tmp_path)  # the config follows: it reloads as an unconditional model
    reloaded = DiffiTTransformer2DModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_eps(reloaded, x, t, None), expected, rtol=1e-5, atol=1e-6)

    resize_class_embedding(model, 3)  # and back: every class starts as the unconditional model
    for y in range(4):
        torch.testing.assert_close(_eps(model, x, t, torch.tensor([y, y])), expected, rtol=1e-5, atol=1e-6)


def test_resize_class_embedding_rejects_bad_maps():
    model = tiny_transformer(num_classes=5)
    with pytest.raises(ValueError, match="num_classes"):
        resize_class_embedding(model, -1)
    with pytest.raises(ValueError, match="one entry per new class"):
        resize_class_embedding(model, 3, class_map=[0, 1])
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        resize_class_embedding(model, 2, class_map=[0, 5])  # 5 is the null row, not a class


def test_default_class_map_by_name_then_by_id():
    id2label = {0: ["tench", "Tinca tinca"], 1: "goldfish", 2: ["crane"], 3: ["crane"]}
    names = ["Goldfish", "tinca tinca", "zebra", "crane", "tench, Tinca tinca"]
    assert default_class_map(names, id2label, 4, 5) == [1, 0, None, None, 0]  # ambiguous "crane" -> new class
    assert default_class_map(names, None, 4, 5) == [0, 1, 2, 3, None]
    assert default_class_map(None, id2label, 4, 2) == [0, 1]
