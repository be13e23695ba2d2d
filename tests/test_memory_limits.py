"""Memory limits of `DiffiTPipeline.__call__`: `max_batch_size` splits a request into batches that give the images one
batch gives, and a request that cannot fit is refused before any work, naming `max_batch_size` as the fix.

The split results are compared with a tolerance (1e-5, relative and absolute): a kernel may sum in another order for another batch size."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from diffusers_diffit import memory, official_scheduler

from .utils import make_pipe, tiny_transformer


def forward_batches(pipe) -> list[int]:
    """Records the batch size of every transformer forward from now on."""
    sizes = []
    pipe.transformer.register_forward_hook(lambda module, args, output: sizes.append(len(args[0])))
    return sizes


def test_split_with_per_image_generators_gives_the_same_images_for_a_stochastic_scheduler():
    pipe = make_pipe()  # NVIDIA's DDPM scheduler: every step draws noise from the generators
    request = dict(
        class_labels=[1, 2, 3], num_images_per_label=2, num_inference_steps=3, guidance_scale=1.0, output_type="np"
    )
    whole = pipe(**request, generator=[torch.Generator().manual_seed(i) for i in range(6)]).images
    sizes = forward_batches(pipe)
    split = pipe(**request, generator=[torch.Generator().manual_seed(i) for i in range(6)], max_batch_size=4).images
    assert whole.shape == split.shape == (6, 16, 16, 3)
    np.testing.assert_allclose(split, whole, atol=1e-5)
    assert sizes == [4] * 3 + [2] * 3  # 4 then 2 images, 3 steps each (no guidance: one forward per step)


@pytest.mark.parametrize("output_type", ["np", "pil", "latent"])
def test_split_with_one_generator_gives_the_same_images_for_a_deterministic_scheduler(output_type):
    pipe = make_pipe(scheduler=DDIMScheduler.from_config(official_scheduler().config))
    request = dict(class_labels=None, num_images_per_label=5, num_inference_steps=3, output_type=output_type)
    whole = pipe(**request, generator=torch.manual_seed(0)).images
    split = pipe(**request, generator=torch.manual_seed(0), max_batch_size=2).images  # 2 + 2 + 1
    assert len(split) == len(whole) == 5
    if output_type == "pil":  # uint8 pixels: at most one step of rounding apart
        split, whole = np.stack([np.asarray(i, dtype=float) for i in split]), np.stack([np.asarray(i) for i in whole])
        np.testing.assert_allclose(split, whole, atol=1)
    else:
        np.testing.assert_allclose(np.asarray(split), np.asarray(whole), rtol=1e-5, atol=1e-5)


def test_huge_request_is_refused_before_any_work(monkeypatch):
    # a 64×64-latent model (512 px with a factor-8 VAE), 1024 images, 8 GiB free: nothing may be allocated or run
    pipe = make_pipe(transformer=tiny_transformer(sample_size=64, patch_size=2))
    monkeypatch.setattr(memory, "available_bytes", lambda device: 8 * 2**30)
    monkeypatch.setattr(pipe.transformer, "forward", lambda *a, **k: pytest.fail("the transformer ran"))
    with pytest.raises(ValueError, match=r"`max_batch_size` is None: sampling 1024 images at once needs about") as e:
        pipe(None, num_images_per_label=1024)
    fits = int(str(e.value).split("max_batch_size=")[1].split(" ")[0])
    assert 1 <= fits < 1024 and "GiB is available" in str(e.value)
    assert memory.activation_bytes(pipe, fits) <= memory.USABLE_FRACTION * 8 * 2**30
    assert memory.activation_bytes(pipe, fits + 1) > memory.USABLE_FRACTION * 8 * 2**30
    with pytest.raises(ValueError, match=r"`max_batch_size` is 1024"):
        pipe(None, num_images_per_label=1024, max_batch_size=1024)
    memory.check_fits(pipe, 1024, fits, torch.device("cpu"))  # batches of `fits` pass the check


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "8"])
def test_bad_max_batch_size_is_explained(value):
    with pytest.raises(ValueError, match=r"`max_batch_size` must be an int >= 1 or None"):
        make_pipe()(None, max_batch_size=value)


def test_cli_samples_in_batches_and_explains_a_bad_max_batch_size(tmp_path, capsys):
    from PIL import Image

    from diffusers_diffit import cli

    with pytest.raises(SystemExit) as exit:
        cli.main(["sample", "--max-batch-size", "0"])
    assert exit.value.code == 2 and "argument --max-batch-size" in capsys.readouterr().err
    grids = []
    for max_batch_size in ["2", "3"]:  # 2 + 1 images, then one batch of 3
        output = tmp_path / f"grid-{max_batch_size}.png"
        argv = ["sample", "--labels", "3", "--num-images-per-label", "3", "--steps", "2", "--output", str(output)]
        assert cli.main([*argv, "--max-batch-size", max_batch_size]) == 0
        grids.append(np.asarray(Image.open(output), dtype=int))
    assert grids[0].shape == grids[1].shape and np.abs(grids[0] - grids[1]).max() <= 1  # uint8 rounding at most
