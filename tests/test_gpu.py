"""CUDA: both models, the pipelines and a training step on the GPU, against the same computation on the CPU.

Every test here is marked `gpu` and skipped without CUDA (conftest.py); CI has no GPU, so these run on a GPU
machine by hand (`pytest -q -m gpu tests`). The attention backends that exist only on CUDA are checked in
test_transformer.py (`test_cuda_backends_match_native`) and below for the windowed U-Net.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from sklearn.svm import SVC

from diffusers_diffit import DiffiTPipeline, embedded_model_path
from diffusers_diffit.data.digits import digits_split, model_to_ink
from diffusers_diffit.losses import edm_loss
from diffusers_diffit.pipelines import OFFICIAL_RECIPES, official_scheduler
from tests.utils import make_pipe, relative_error, tiny_transformer_16, tiny_unet, transformer_inputs


pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _exact_fp32():
    """TF32 would make CUDA fp32 differ from the CPU by ~1e-3; the fp32 comparisons below want float precision."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def test_transformer_cuda_fp32_matches_cpu():
    model = tiny_transformer_16()
    x, t, y = transformer_inputs()
    expected = model(x, t, y).sample
    model.cuda()
    assert relative_error(model(x.cuda(), t.cuda(), y.cuda()).sample, expected) < 1e-5


@torch.no_grad()
def test_unet_cuda_fp32_matches_cpu_and_every_cuda_backend_matches_in_fp16():
    model = tiny_unet()
    x, y = torch.randn(3, 1, 16, 16), torch.tensor([1, 2, 10])
    t = torch.tensor([0.1, 1.0, 3.0])
    expected = model(x, t, class_labels=y).sample
    model.cuda()
    x, t, y = x.cuda(), t.cuda(), y.cuda()
    assert relative_error(model(x, t, class_labels=y).sample, expected) < 1e-5

    model.half()
    native = model(x.half(), t, class_labels=y).sample
    assert relative_error(native, expected) < 2e-2
    for backend in ("_native_efficient", "_native_cudnn"):
        model.set_attention_backend(backend)
        assert relative_error(model(x.half(), t, class_labels=y).sample, native) < 1e-2, backend
    model.reset_attention_backend()


def test_training_step_with_bf16_autocast_and_checkpointing():
    """The EDM loss and its gradients on CUDA under bf16 autocast with gradient checkpointing, against fp32 on the
    CPU from the same noise draws (the generator stays on the CPU)."""
    model = tiny_unet(class_dropout_prob=0.0).train()
    clean, labels = torch.randn(8, 1, 16, 16) * 0.5, torch.arange(8)

    def loss_and_grads(device, autocast):
        model.to(device).zero_grad()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = edm_loss(model, clean.to(device), labels.to(device), generator=torch.Generator().manual_seed(0))
        loss.backward()
        return loss.detach().cpu(), torch.cat([p.grad.flatten().cpu() for p in model.parameters()])

    loss_cpu, grads_cpu = loss_and_grads("cpu", autocast=False)
    model.enable_gradient_checkpointing()
    loss_cuda, grads_cuda = loss_and_grads("cuda", autocast=True)
    assert torch.isfinite(grads_cuda).all()
    assert abs(loss_cuda - loss_cpu) < 2e-2 * loss_cpu
    assert torch.nn.functional.cosine_similarity(grads_cuda, grads_cpu, dim=0) > 0.99


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_embedded_pipeline_in_half_precision_draws_the_digits_asked_for(dtype):
    """The shipped model in half precision on CUDA: the Heun trajectory stays close to fp32 and an SVM trained on
    real digits recognises the samples."""
    pipe = DiffiTPipeline.from_pretrained(embedded_model_path("digits"))
    pipe.set_progress_bar_config(disable=True)
    labels = list(range(10))

    def sample():
        return (
            pipe(labels, num_images_per_label=4, generator=torch.Generator().manual_seed(1), output_type="latent")
            .images.float()
            .cpu()
        )

    pipe.to("cuda")
    full = sample()
    pipe.to("cuda", dtype)
    half = sample()
    assert torch.isfinite(half).all() and half.shape == (40, 1, 16, 16)
    assert (half - full).abs().mean() < 2e-2

    train_ink, train_labels, _, _ = digits_split()
    svm = SVC(C=10, gamma="scale").fit(train_ink.reshape(len(train_ink), -1), train_labels)
    predicted = svm.predict(model_to_ink(half).reshape(40, -1))
    assert (predicted == np.repeat(labels, 4)).mean() >= 0.9


@torch.no_grad()
def test_latent_pipeline_fp16_on_cuda_matches_fp32_on_cpu():
    """Latent DiffiT + a tiny SD-style VAE + DDIM with NVIDIA's guidance recipe: fp16 on CUDA against fp32 on CPU."""
    pipe = make_pipe(scheduler=DDIMScheduler.from_config(official_scheduler().config), **OFFICIAL_RECIPES[256])

    def sample():
        return (
            pipe([1, 7], num_inference_steps=8, generator=torch.Generator().manual_seed(0), output_type="pt")
            .images.float()
            .cpu()
        )

    expected = sample()
    pipe.to("cuda", torch.float16)
    images = sample()
    assert images.shape == expected.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    assert (images - expected).abs().max() < 2e-2


@pytest.mark.parametrize("factory", [tiny_transformer_16, tiny_unet], ids=["transformer", "unet"])
def test_cuda_only_backends_are_checked_again_when_the_model_moves(factory):
    """Set on a CUDA half-precision model, cuDNN attention is refused when the model moves to fp32 or to the CPU;
    'native' moves anywhere."""
    model = factory().cuda().half()
    model.set_attention_backend("_native_cudnn")
    with pytest.raises(ValueError, match="'_native_cudnn' runs only on cuda in float16 or bfloat16.*float32"):
        model.float()
    model.half().set_attention_backend("_native_efficient")
    with pytest.raises(ValueError, match="'_native_efficient' runs only on cuda.*device 'cpu'"):
        model.cpu()
    model.set_attention_backend("native")
    model.cuda()
    model.reset_attention_backend()


def test_gpu_suite_runs_one_small_row(tmp_path):
    """benchmarks/gpu_suite.py on CUDA with the tiny config (compile, CUDA graphs, every CUDA backend)."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "--tiny",
            "--device",
            "cuda",
            "--resolutions",
            "256",
            "--dtypes",
            "bf16",
            "--batches",
            "2",
            "--window",
            "1",
            "--warmup",
            "1",
            "--repeats",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "DiffiT fused, compile + CUDA graphs" in result.stdout and "GPU-hours" in result.stdout
