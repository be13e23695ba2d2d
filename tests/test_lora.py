"""LoRA adapters (diffusers_diffit/loaders) and fine-tuning onto new classes (label-table rows saved with them).

References: a LoRA layer computes W·x + b + (α/r)·s·B·A·x (the LoRA paper's update, PEFT's scaling α/r), so the
adapted model must equal the base model with its weights replaced by W + (α/r)·s·B·A, merged here by hand.
Comparisons between two forwards of the same module instances are bitwise (one process, one kernel path); those
against the hand-merged copy use tolerances.
"""

import copy

import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from benchmarks.lora_study import do, main, undo
from diffusers_diffit.data.digits import model_to_ink, write_digits_folder
from diffusers_diffit.finetuning import class_rows_state_dict, resize_class_embedding, train_class_rows
from tests.utils import make_pipe, tiny_transformer, tiny_unet, transformer_inputs


SPATIAL = ["to_q", "to_k", "to_v", "to_out"]
# every linear layer of the transformer: the adapter measured on digits-latent (docs/digits-benchmarks.md)
ALL_LINEAR = SPATIAL + ["to_q_time", "to_k_time", "to_v_time", "ff.net.0.proj", "ff.net.2", "proj_out"]
ALL_LINEAR += ["linear_1", "linear_2"]
RANK, ALPHA = 4, 8


def add_random_lora(model, target_modules=SPATIAL, rank=RANK, alpha=ALPHA, seed=1):
    """A LoRA adapter with random A and B (B = 0 at PEFT's init would make it a no-op)."""
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, init_lora_weights=False))
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data.normal_(std=0.2)
    return model


def merged_by_hand(base, adapted, scale=1.0):
    """`base` with every adapted linear's weight replaced by W + (α/r)·scale·B·A."""
    merged = copy.deepcopy(base)
    state = adapted.state_dict()
    for name, module in merged.named_modules():
        if f"{name}.lora_A.default.weight" in state:
            a, b = state[f"{name}.lora_A.default.weight"], state[f"{name}.lora_B.default.weight"]
            module.weight.data += ALPHA / RANK * scale * b @ a
    return merged


def forward(model, inputs, **kwargs):
    return model(*inputs, **kwargs).sample


def saved_adapter(tmp_path, pipe_cls, model):
    pipe_cls.save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
    )
    return tmp_path


def test_spatial_targets_leave_the_time_projections_alone():
    model = add_random_lora(tiny_transformer())
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(SPATIAL)
    assert all(type(m.attn.to_q_time) is torch.nn.Linear for m in model.transformer_blocks)


@torch.no_grad()
def test_adapter_equals_hand_merged_weights_at_every_scale():
    base = tiny_transformer()
    model = add_random_lora(copy.deepcopy(base))
    inputs = transformer_inputs(size=8)
    for scale in (1.0, 0.5):
        expected = forward(merged_by_hand(base, model, scale), inputs)
        torch.testing.assert_close(forward(model, inputs, attention_kwargs={"scale": scale}), expected)
    assert not torch.allclose(forward(model, inputs), forward(base, inputs), atol=1e-3)  # the adapter matters
    torch.testing.assert_close(forward(model, inputs, attention_kwargs={"scale": 0.0}), forward(base, inputs))


@torch.no_grad()
def test_unet_takes_adapters_and_the_runtime_scale():
    base = tiny_unet()
    model = add_random_lora(copy.deepcopy(base))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([0.3, -1.0])
    expected = merged_by_hand(base, model, 0.5)(x, t).sample
    torch.testing.assert_close(model(x, t, attention_kwargs={"scale": 0.5}).sample, expected)


def test_all_linear_targets_wrap_every_linear_layer():
    model = add_random_lora(tiny_transformer(), target_modules=ALL_LINEAR)
    plain = [
        n
        for n, m in model.named_modules()
        if type(m) is torch.nn.Linear and ".lora_" not in n and not n.endswith(".base_layer")
    ]
    assert plain == [], f"linear layers without an adapter: {plain}"


@torch.no_grad()
@pytest.mark.parametrize("targets", [SPATIAL, ALL_LINEAR], ids=["spatial", "all-linear"])
def test_pipeline_save_load_fuse_unfuse_unload_round_trip(tmp_path, targets):
    trained = add_random_lora(tiny_transformer(), target_modules=targets)
    pipe = make_pipe(tiny_transformer())
    folder = saved_adapter(tmp_path, type(pipe), trained)
    keys = load_file(folder / "pytorch_lora_weights.safetensors")
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)  # diffusers' format

    inputs = transformer_inputs(size=8)
    base = forward(pipe.transformer, inputs)
    expected = forward(trained, inputs)
    pipe.load_lora_weights(folder)
    torch.testing.assert_close(forward(pipe.transformer, inputs), expected, rtol=0, atol=0)
    torch.testing.assert_close(forward(pipe.transformer, inputs, attention_kwargs={"scale": 0.0}), base)
    pipe.fuse_lora()
    torch.testing.assert_close(forward(pipe.transformer, inputs), expected, rtol=1e-5, atol=1e-5)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert not any("lora" in n for n, _ in pipe.transformer.named_parameters())
    # W + ΔW - ΔW in float32: rounding grows with the adapted layers (all linear: 3e-6 measured)
    torch.testing.assert_close(forward(pipe.transformer, inputs), base, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_pipeline_scale_and_adapter_switches_reach_the_sampler(tmp_path):
    pipe = make_pipe(tiny_transformer())
    folder = saved_adapter(tmp_path, type(pipe), add_random_lora(tiny_transformer()))
    call = dict(class_labels=[1, 2], num_inference_steps=2, guidance_scale=2.0, output_type="latent")
    base = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(folder, adapter_name="style")
    styled = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    off = pipe(**call, generator=torch.Generator().manual_seed(0), attention_kwargs={"scale": 0.0}).images
    torch.testing.assert_close(off, base, rtol=0, atol=0)
    assert not torch.allclose(styled, base)
    pipe.set_adapters("style", 0.0)
    torch.testing.assert_close(pipe(**call, generator=torch.Generator().manual_seed(0)).images, base)


def test_a_lora_for_another_architecture_or_rank_names_the_mismatched_keys(tmp_path):
    pipe = make_pipe(tiny_transformer())
    other = add_random_lora(tiny_transformer(), rank=RANK)
    state = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(other).items()}

    foreign = dict(state) | {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8)}
    with pytest.raises(ValueError, match=r"single_transformer_blocks\.0\.attn\.to_q\.lora_A\.weight.*no linear"):
        pipe.load_lora_weights(foreign)

    wider = dict(state)
    key = "transformer.transformer_blocks.0.attn.to_k.lora_A.weight"
    wider[key] = torch.zeros(RANK, state[key].shape[1] * 2)  # a wider model's layer
    with pytest.raises(ValueError, match=r"to_k\.lora_A\.weight: shape"):
        pipe.load_lora_weights(wider)

    other_rank = dict(state)
    key = "transformer.transformer_blocks.0.attn.to_v.lora_B.weight"
    other_rank[key] = torch.zeros(state[key].shape[0], 2 * RANK)  # B of rank 8 against A of rank 4
    with pytest.raises(ValueError, match=r"to_v\.lora_B\.weight: rank 8"):
        pipe.load_lora_weights(other_rank)

    path = saved_adapter(tmp_path, type(pipe), other) / "pytorch_lora_weights.safetensors"
    with safe_open(path, "pt") as f:  # the file's LoraConfig says r=4; rewrite its tensors at rank 2
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file({k: (v[:2] if "lora_A" in k else v[:, :2]).contiguous() for k, v in tensors.items()}, path, metadata)
    with pytest.raises(ValueError, match=r"lora_A\.weight: rank 2, the adapter's rank is 4"):
        pipe.load_lora_weights(tmp_path)
    assert not any("lora" in n for n, _ in pipe.transformer.named_parameters())  # nothing was loaded

    with pytest.raises(ValueError, match="must start with 'transformer.'"):
        pipe.load_lora_weights({k.removeprefix("transformer."): v for k, v in state.items()})


def new_class_finetune(base, num_classes=7):
    """What `train_diffit.py --lora_rank` does with a dataset of more classes: grow the table (old rows kept, null
    moved last, new rows = the null row), train the new rows and a LoRA; here one fake step changes them."""
    model = copy.deepcopy(base)
    old = model.config.num_classes
    resize_class_embedding(model, num_classes)
    initial = model.condition_embed.class_embedder.weight.detach().clone()
    add_random_lora(model)
    hook = train_class_rows(model, range(old, num_classes))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.0)
    x, t, _ = transformer_inputs(batch=8, size=8)
    forward(model, (x, t, torch.arange(8) % (num_classes + 1))).square().mean().backward()
    optimizer.step()
    hook.remove()
    return model, initial


def test_new_class_rows_train_alone_and_round_trip_with_the_adapter(tmp_path):
    base = tiny_transformer(num_classes=4)
    model, initial = new_class_finetune(base)
    table, old_table = model.condition_embed.class_embedder.weight.detach(), base.condition_embed.class_embedder.weight
    torch.testing.assert_close(table[:4], old_table[:4], rtol=0, atol=0)  # old rows kept
    torch.testing.assert_close(table[7], old_table[4], rtol=0, atol=0)  # the null row, moved to the new last index
    rows = class_rows_state_dict(model, initial)
    assert rows["condition_embed.class_embedder.class_row_ids"].tolist() == [4, 5, 6]  # only the changed rows

    pipe = make_pipe(copy.deepcopy(base))
    pipe.save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(model) | rows,
        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
    )
    x, t, _ = transformer_inputs(batch=8, size=8)
    labels = torch.arange(8)  # 0-6 and the null class 7
    with torch.no_grad():
        expected = forward(model.eval(), (x, t, labels))
        base_out = forward(pipe.transformer, (x, t, torch.tensor([0, 1, 2, 3, 4, 4, 4, 4])))
        pipe.load_lora_weights(tmp_path)
        assert pipe.transformer.config.num_classes == 7
        torch.testing.assert_close(forward(pipe.transformer, (x, t, labels)), expected, rtol=0, atol=0)
        pipe.unload_lora_weights()  # the table is the base's again
        assert pipe.transformer.config.num_classes == 4
        torch.testing.assert_close(pipe.transformer.condition_embed.class_embedder.weight, old_table, rtol=0, atol=0)
        torch.testing.assert_close(
            forward(pipe.transformer, (x, t, torch.tensor([0, 1, 2, 3, 4, 4, 4, 4]))), base_out, rtol=0, atol=0
        )


def test_a_new_class_finetune_may_not_overwrite_the_null_class(tmp_path):
    model = tiny_transformer(num_classes=4)
    resize_class_embedding(model, 6)
    with pytest.raises(ValueError, match="null class"):
        train_class_rows(model, [4, 5, 6])
    initial = model.condition_embed.class_embedder.weight.detach().clone()
    with torch.no_grad():
        model.condition_embed.class_embedder.weight[6] += 1  # a fine-tune that trained the null row
    with pytest.raises(ValueError, match="null class"):
        class_rows_state_dict(model, initial)

    pipe = make_pipe(tiny_transformer(num_classes=4))
    rows = {
        "transformer.condition_embed.class_embedder.class_rows": torch.zeros(1, initial.shape[1]),
        "transformer.condition_embed.class_embedder.class_row_ids": torch.tensor([6]),
        "transformer.condition_embed.class_embedder.num_classes": torch.tensor(6),
    }
    with pytest.raises(ValueError, match=r"class_row_ids.*\[6\] would overwrite the null class"):
        pipe.load_lora_weights(rows)


@pytest.mark.parametrize("transform", ["rot90", "rot180"])
def test_style_study_rotates_images_as_it_undoes_ink(tmp_path, transform):
    """benchmarks/lora_study judges samples by undoing the transform on 8×8 ink: rotating the 32-px training images
    (`prepare`) must be the same rotation of their ink, or a perfect fine-tune would score as a poor one."""
    write_digits_folder(tmp_path / "upright", size=32)
    main(["prepare", str(tmp_path / "upright"), str(tmp_path / "turned"), "--transform", transform])
    paths = sorted((tmp_path / "upright").glob("[37]/*.png"))[:20]  # 3 and 7: no symmetry that hides a wrong turn

    def ink(root):
        levels = np.stack([np.array(Image.open(root / p.parent.name / p.name)) for p in paths])
        return model_to_ink(torch.from_numpy(levels / 65535 * 2 - 1)[:, None])

    upright, turned = ink(tmp_path / "upright"), ink(tmp_path / "turned")
    np.testing.assert_allclose(turned, do(transform, upright), atol=1e-4)
    np.testing.assert_allclose(undo(transform, turned), upright, atol=1e-4)
    assert not np.allclose(turned, upright, atol=0.05)
