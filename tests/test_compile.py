"""torch.compile on the CPU: no graph breaks, compiled == eager, no recompiles in the sampling loop.

Tolerances: compiled and eager run different kernels (inductor's generated C++ against aten), so they agree to a
tolerance (1e-5 on outputs of order 1), never bitwise. Compile time: inductor (a C++ compiler per kernel) compiles
one one-layer transformer for one shape; the U-Net and `compile_repeated_blocks` go through dynamo and AOT autograd
with the "aot_eager" backend (the same graphs, no C++), and the recompile checks count graphs with a backend that
runs them as traced.
"""

import json

import pytest
import torch
import torch._dynamo

from diffusers_diffit.models.attention import DiffiTTransformerBlock
from diffusers_diffit.models.unet_diffit import DiffiTResBlock
from tests.utils import make_pipe, tiny_transformer_16, tiny_unet, transformer_inputs


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def transformer_case():
    return tiny_transformer_16(), transformer_inputs()


def unet_case(**overrides):
    """Two levels (8² with 4×4 windows, then 4² global): the U-Net's every kind of block, few distinct shapes."""
    model = tiny_unet(**{"sample_size": 8, "block_out_channels": (16, 32), **overrides})
    return model, (torch.randn(3, 1, 8, 8), torch.tensor([0.1, -0.4, 1.2]), torch.tensor([1, 2, 10]))


CASES = {"transformer": transformer_case, "unet": unet_case}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_whole_model_traces_without_graph_breaks(name, grad):
    model, args = CASES[name]()
    model.train(grad)
    with torch.set_grad_enabled(grad):
        explanation = torch._dynamo.explain(model)(*args)
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.parametrize("name, block_cls", [("transformer", DiffiTTransformerBlock), ("unet", DiffiTResBlock)])
def test_repeated_blocks_trace_without_graph_breaks(name, block_cls):
    """`compile_repeated_blocks` compiles each `_repeated_blocks` module on its own: each must be one graph."""
    model, args = CASES[name]()
    assert model._repeated_blocks == [block_cls.__name__]
    inputs = []
    block = next(m for m in model.modules() if isinstance(m, block_cls))
    hook = block.register_forward_pre_hook(lambda module, block_args: inputs.append(block_args))
    with torch.no_grad():
        model(*args)
    hook.remove()
    with torch.no_grad():
        explanation = torch._dynamo.explain(block)(*inputs[0])
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]


def counting_backend(graphs: list):
    """A dynamo backend that records each graph it is given and runs it as traced."""

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


@pytest.mark.parametrize("name, block_cls", [("transformer", DiffiTTransformerBlock), ("unet", DiffiTResBlock)])
def test_compile_repeated_blocks_matches_eager(name, block_cls):
    """diffusers' `compile_repeated_blocks(fullgraph=True)`: same output as eager, and exactly one graph per distinct
    block input shape, not one per block (the latent model's blocks are all alike; the U-Net's levels differ)."""
    model, args = CASES[name]()
    shapes = set()
    hooks = [
        m.register_forward_pre_hook(lambda module, block_args: shapes.add(tuple(block_args[0].shape)))
        for m in model.modules()
        if isinstance(m, block_cls)
    ]
    with torch.no_grad():
        expected = model(*args).sample
    for hook in hooks:
        hook.remove()
    graphs = []
    model.compile_repeated_blocks(fullgraph=True, dynamic=False, backend=counting_backend(graphs))
    with torch.no_grad():
        actual = model(*args).sample
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert len(graphs) == len(shapes)
    if name == "transformer":
        assert len(graphs) == 1 < len(hooks)


def test_fullgraph_inductor_matches_eager():
    """`torch.compile(model, fullgraph=True)` with inductor on the CPU, a one-layer model, one shape: ≤ 1e-5."""
    model = tiny_transformer_16(num_layers=1, sample_size=8)
    x, t, y = transformer_inputs(batch=2, size=8)
    with torch.no_grad():
        expected = model(x, t, y).sample
        actual = torch.compile(model, fullgraph=True)(x, t, y).sample
    assert (actual - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name, grad", [("transformer", False), ("transformer", True), ("unet", False)])
def test_fullgraph_aot_autograd_matches_eager(name, grad):
    """Both models through dynamo + AOT autograd (functionalised, decomposed graphs; gradients too): ≤ 1e-5."""
    model, args = CASES[name]()
    model.train(grad)
    if grad:  # no label dropout, so both runs see the same labels
        model.condition_embed.class_dropout_prob = 0.0
    with torch.set_grad_enabled(grad):
        expected = model(*args).sample
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        actual = compiled(*args).sample
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        if grad:
            (weight,) = [p for n, p in model.named_parameters() if n.endswith("relative_position_bias_table")][:1]
            eager_grad = torch.autograd.grad(expected.square().mean(), weight)[0]
            compiled_grad = torch.autograd.grad(compiled(*args).sample.square().mean(), weight)[0]
            torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("guidance_interval", [None, (0, 400)])
def test_pipeline_loop_compiles_once_not_per_step(guidance_interval):
    """The sampling loop calls the compiled transformer with a new timestep every step: the timestep must be a
    graph input, not a constant, so the loop compiles once per batch shape (twice with a guidance interval, whose
    unguided steps run half the batch), never once per step."""
    pipe = make_pipe()  # the official DDPM recipe
    graphs = []
    pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, backend=counting_backend(graphs))
    kwargs = dict(num_inference_steps=6, output_type="latent", guidance_scale=4.0, guidance_interval=guidance_interval)
    pipe([1, 7], generator=torch.Generator().manual_seed(0), **kwargs)
    first = len(graphs)
    assert first == (1 if guidance_interval is None else 2)
    pipe([3, 2], generator=torch.Generator().manual_seed(1), **kwargs)  # new labels and noise: nothing new to compile
    assert len(graphs) == first


def test_compile_study_times_a_cold_regional_compile_against_eager(tmp_path, monkeypatch, capsys):
    """benchmarks/compile_study.py end to end on the tiny transformer (inductor, a fresh process for the cold start):
    one row per variant, the compiled output within 1e-5 of eager's, a cold compile that takes time."""
    from benchmarks import compile_study

    output = tmp_path / "compile.jsonl"
    argv = ["compile_study", "--model", "tiny-transformer", "--threads", "1", "--rounds", "2", "--output", str(output)]
    monkeypatch.setattr("sys.argv", [*argv, "--variants", "regional"])
    compile_study.main()
    rows = {row["variant"]: row for row in map(json.loads, output.read_text().splitlines())}
    assert sorted(rows) == ["eager", "regional"]  # eager always runs: it is the baseline
    assert rows["eager"]["ratio_to_eager"] == 1.0
    assert rows["regional"]["max_abs_diff"] <= 1e-5
    assert rows["regional"]["compile_s"] > rows["regional"]["steady_median_s"] > 0
    assert "| regional |" in capsys.readouterr().out


def test_compile_study_refuses_an_unknown_model_before_any_work(monkeypatch, capsys):
    from benchmarks import compile_study

    monkeypatch.setattr("sys.argv", ["compile_study", "--model", "DiffiT-XXL/2"])
    with pytest.raises(SystemExit) as exit_:
        compile_study.main()
    assert exit_.value.code == 2
    assert "'DiffiT-XXL/2' is not a named model configuration" in capsys.readouterr().err
