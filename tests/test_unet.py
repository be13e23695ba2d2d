"""DiffiTUNet2DModel: windowed TMSA against a per-window loop, window planning, conditioning, save/load, errors."""

import pytest
import torch
import torch.nn.functional as F
from accelerate import init_empty_weights

from diffusers_diffit import DIFFIT_UNET_CONFIGS, DiffiTAttnProcessor, DiffiTUNet2DModel
from diffusers_diffit.models.unet_diffit import DiffiTResBlock
from tests.utils import named_model, tiny_unet


def reference_resblock(block: DiffiTResBlock, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """Eq. 9-10 with the windows cut out one by one: every w×w window attends only to itself with the same x_t."""
    w = block.window_size
    x_hat = block.conv(F.silu(block.norm(x)))
    out = torch.empty_like(x_hat)
    for r in range(0, x.shape[-2], w):
        for c in range(0, x.shape[-1], w):
            tokens = x_hat[:, :, r : r + w, c : c + w].flatten(2).transpose(1, 2)  # [B, w², C], row-major
            out[:, :, r : r + w, c : c + w] = block.transformer(tokens, temb).transpose(1, 2).unflatten(2, (w, w))
    return out + (x if block.conv_shortcut is None else block.conv_shortcut(x))


def test_attention_gets_row_major_windows_and_their_count():
    block = DiffiTResBlock(12, 16, 4, 8, 10, 4.0, 0.0, 32).eval()
    calls = []

    class Recording(DiffiTAttnProcessor):
        def __call__(self, attn, hidden_states, temb, num_windows=1):
            calls.append((hidden_states, num_windows))
            return super().__call__(attn, hidden_states, temb, num_windows)

    block.transformer.attn.set_processor(Recording())
    x, temb = torch.randn(2, 12, 8, 12), torch.randn(2, 10)
    block(x, temb)
    ((windows, num_windows),) = calls
    assert windows.shape == (2 * 6, 16, 16) and num_windows == 6  # 2 rows x 3 cols of 4x4 windows per sample
    x_hat = block.transformer.norm1(block.conv(F.silu(block.norm(x))).permute(0, 2, 3, 1))  # [B, H, W, C]
    torch.testing.assert_close(windows[6 + 5], x_hat[1, 4:8, 8:12].flatten(0, 1))  # sample 1, window row 1, col 2
    with pytest.raises(ValueError, match="num_windows=4"):
        block.transformer(windows, temb, num_windows=4)


@pytest.mark.parametrize("shape", [(8, 8), (8, 16), (16, 4)])
def test_resblock_matches_per_window_loop(shape):
    block = DiffiTResBlock(
        12, 16, window_size=4, attention_head_dim=8, time_embed_dim=10, mlp_ratio=4.0, dropout=0.0, norm_num_groups=32
    ).eval()
    x, temb = torch.randn(3, 12, *shape), torch.randn(3, 10)
    torch.testing.assert_close(block(x, temb), reference_resblock(block, x, temb), rtol=1e-4, atol=1e-5)


def test_time_token_reaches_every_window():
    block = DiffiTResBlock(16, 16, 4, 8, 10, 4.0, 0.0, 32).eval()
    x = torch.randn(1, 16, 8, 8)
    change = (block(x, torch.randn(1, 10)) - block(x, torch.randn(1, 10))).abs()
    per_window = change.unflatten(-1, (2, 4)).unflatten(-3, (2, 4)).amax(dim=(0, 1, 3, 5))  # [2, 2] windows
    assert (per_window > 1e-3).all()


def test_window_plan_map_no_larger_than_window_is_global():
    model = tiny_unet(window_size=8)  # maps 16, 8, 4
    assert model.window_sizes == [8, 8, 4]
    deepest = model.down_blocks[2][0]
    assert deepest.window_size == 4
    assert deepest.transformer.attn.relative_position_bias_table.shape == ((2 * 4 - 1) ** 2, 32 // 8)
    # one window over the whole 4x4 map: the block equals plain attention over all 16 tokens
    x, temb = torch.randn(2, 32, 4, 4), torch.randn(2, 24)
    torch.testing.assert_close(deepest(x, temb), reference_resblock(deepest, x, temb), rtol=1e-4, atol=1e-5)


def test_every_block_has_its_own_bias_table():
    model = tiny_unet(layers_per_block=2)
    tables = [
        m.transformer.attn.relative_position_bias_table for m in model.modules() if isinstance(m, DiffiTResBlock)
    ]
    assert len(tables) == 2 * 2 * 3  # encoder + decoder, 2 per level, 3 levels
    assert len({t.data_ptr() for t in tables}) == len(tables)
    assert len({n for n, _ in model.named_parameters() if n.endswith("relative_position_bias_table")}) == len(tables)


def test_paper_configs_build_on_meta_with_the_paper_windows():
    with init_empty_weights():
        cifar = DiffiTUNet2DModel(**DIFFIT_UNET_CONFIGS["DiffiT-CIFAR10"])
        ffhq = DiffiTUNet2DModel(**DIFFIT_UNET_CONFIGS["DiffiT-FFHQ64"])
    assert cifar.window_sizes == [4, 4, 4]  # 32, 16, 8 with window 4
    assert ffhq.window_sizes == [8, 8, 8, 8]  # 64, 32, 16, 8 with window 8: global at 8x8
    heads = {m.transformer.attn.heads for m in ffhq.modules() if isinstance(m, DiffiTResBlock)}
    assert heads == {128 // 32, 256 // 32}
    assert len(cifar.down_blocks) == 3 and all(len(level) == 4 for level in cifar.down_blocks + cifar.up_blocks)


def test_head_is_zero_initialised():
    model = named_model("tiny-unet")
    out = model(torch.randn(2, 1, 16, 16), 0.3, class_labels=torch.tensor([1, 2])).sample
    assert torch.count_nonzero(out) == 0


def test_shapes_non_square_and_out_channels():
    model = tiny_unet(in_channels=3, out_channels=6)
    out = model(torch.randn(2, 3, 16, 32), torch.tensor([0.1, -0.5]), class_labels=torch.tensor([0, 9])).sample
    assert out.shape == (2, 6, 16, 32) and torch.isfinite(out).all()
    out = model(torch.randn(1, 3, 32, 16), 0.0, return_dict=False)[0]
    assert out.shape == (1, 6, 32, 16)


def test_class_conditioning_and_null_class():
    model = tiny_unet()
    x = torch.randn(2, 1, 16, 16)
    a = model(x, 0.2, class_labels=torch.tensor([3, 3])).sample
    b = model(x, 0.2, class_labels=torch.tensor([4, 4])).sample
    null = model(x, 0.2, class_labels=torch.tensor([10, 10])).sample
    assert not torch.allclose(a, b)
    torch.testing.assert_close(model(x, 0.2).sample, null)  # None = the null class


def test_unconditional_model():
    model = tiny_unet(num_classes=0)
    assert model.condition_embed.class_embedder is None
    assert model(torch.randn(2, 1, 16, 16), 0.0).sample.shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(2, 1, 16, 16), 0.0, class_labels=torch.tensor([0, 1]))


def test_timestep_changes_output():
    model = tiny_unet()
    x = torch.randn(1, 1, 16, 16)
    assert not torch.allclose(model(x, -1.0).sample, model(x, 1.0).sample)


def public_config(model) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items() if not k.startswith("_")}


def test_save_load_round_trip(tmp_path):
    model = tiny_unet(dropout=0.1)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = DiffiTUNet2DModel.from_pretrained(tmp_path).eval()
    assert public_config(loaded) == public_config(model)
    x, y = torch.randn(2, 1, 16, 16), torch.tensor([1, 10])
    torch.testing.assert_close(loaded(x, 0.5, class_labels=y).sample, model(x, 0.5, class_labels=y).sample)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_unet(class_dropout_prob=0.0).train()
    x, y = torch.randn(2, 1, 16, 16), torch.tensor([1, 2])

    def grads():
        model.zero_grad()
        model(x, 0.3, class_labels=y).sample.square().sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b)


def test_fused_projections_match():
    model = tiny_unet()
    x = torch.randn(2, 1, 16, 16)
    expected = model(x, 0.1, class_labels=torch.tensor([1, 2])).sample
    model.fuse_qkv_projections()
    torch.testing.assert_close(model(x, 0.1, class_labels=torch.tensor([1, 2])).sample, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_out_channels=(16, 30)), "multiple of `attention_head_dim`"),
        (dict(sample_size=12), "sample_size"),
        (dict(sample_size=2), "sample_size"),
        (dict(window_size=0), "window_size"),
        (dict(layers_per_block=0), "layers_per_block"),
        (dict(num_classes=-1), "num_classes"),
        (dict(mlp_ratio=0), "mlp_ratio"),
        (dict(time_embedding_dim=0), "time_embedding_dim"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        named_model("tiny-unet", **kwargs)


@pytest.mark.parametrize(
    "sample, timestep, labels, match",
    [
        (torch.randn(2, 3, 16, 16), 0.0, None, "in_channels|`sample` must be"),
        (torch.randn(2, 1, 16), 0.0, None, "`sample` must be"),
        (torch.randn(2, 1, 12, 16), 0.0, None, "multiples of 16"),
        (torch.randn(2, 1, 16, 16), torch.zeros(3), None, "timestep"),
        (torch.randn(2, 1, 16, 16), 0.0, torch.tensor([0, 11]), r"\[0, 10\]"),
        (torch.randn(2, 1, 16, 16), 0.0, torch.tensor([0.5, 1.0]), "integers"),
    ],
)
def test_bad_inputs(sample, timestep, labels, match):
    with pytest.raises(ValueError, match=match):
        tiny_unet()(sample, timestep, class_labels=labels)
