"""Memory limits of sampling: an estimate, from the config alone, of the activation memory a batch needs; a refusal
before any work when it cannot fit; and `sample_in_batches`, which runs a large request as batches of at most
`max_batch_size` images with the same images as one batch would give (see its docstring for the generator rule)."""

import math
from pathlib import Path

import numpy as np
import torch
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .utils import vae_scale_factor


USABLE_FRACTION = 0.8  # of the memory available now: the rest is left to the weights' copies, the allocator, the OS


def activation_bytes(pipe, images: int) -> int:
    """About the peak activation memory (bytes) of sampling `images` images at once, from the configs: the denoiser's
    largest live tensors for a classifier-free-guided batch (2 × images), or the VAE decoder's at full resolution."""
    config = pipe.transformer.config
    element = torch.finfo(pipe.transformer.dtype).bits // 8
    side = config.sample_size
    if hasattr(config, "patch_size"):  # transformer: the attention scores (and softmax) and the token activations
        tokens = (side // config.patch_size) ** 2
        dim = config.num_attention_heads * config.attention_head_dim
        per_image = 2 * config.num_attention_heads * tokens**2 + tokens * dim * (4 + 2 * config.mlp_ratio)
    elif hasattr(config, "block_out_channels"):  # U-Net: its widest feature maps at full resolution
        per_image = 8 * side * side * max(config.block_out_channels)
    else:  # a denoiser this estimate does not know (a user's own class): only the VAE is counted
        per_image = 0
    total = 2 * images * per_image * element
    if pipe.vae is not None:
        pixels = (side * vae_scale_factor(pipe.vae)) ** 2
        vae_element = torch.finfo(pipe.vae.dtype).bits // 8
        total = max(total, 3 * images * pixels * max(pipe.vae.config.block_out_channels) * vae_element)
    return int(total)


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors now: the CUDA device's free memory, else the system's MemAvailable (Linux); None
    where it cannot be read (the check is then skipped)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def check_max_batch_size(max_batch_size) -> None:
    if max_batch_size is not None and (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int)):
        raise ValueError(f"`max_batch_size` must be an int >= 1 or None, got {max_batch_size!r}.")
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"`max_batch_size` must be an int >= 1 or None, got {max_batch_size}.")


def check_fits(pipe, images: int, max_batch_size: int | None, device: torch.device) -> None:
    """Refuse (`ValueError` naming `max_batch_size`) a request whose batch of min(images, max_batch_size) images would
    need more than `USABLE_FRACTION` of the memory available now; nothing is allocated."""
    at_once = images if max_batch_size is None else min(images, max_batch_size)
    available = available_bytes(device)
    if available is None:
        return
    usable = USABLE_FRACTION * available
    needed = activation_bytes(pipe, at_once)
    if needed <= usable:
        return
    fits = math.floor(usable / activation_bytes(pipe, 1))
    gib = 2**30
    fix = (
        f"pass max_batch_size={fits} (or fewer) to sample in batches"
        if fits >= 1
        else "even one image does not fit: free memory or use a smaller dtype"
    )
    raise ValueError(
        f"`max_batch_size` is {max_batch_size}: sampling {at_once} images at once needs about {needed / gib:.1f} GiB "
        f"of activation memory on {device.type}, and {available / gib:.1f} GiB is available; {fix}."
    )


def sample_in_batches(pipe, labels: torch.Tensor | None, images: int, max_batch_size: int, generator, latents, **call):
    """Run `pipe(**call)` on batches of at most `max_batch_size` of the `images` images (class ids `labels`, None for
    unconditional), with a progress bar over batches, and join the outputs as one call would return them.

    Same images as one batch: with a list of per-image generators, for any scheduler (each image draws its initial and
    its step noise from its own generator). With one generator, the initial noise of every image is drawn up front, in
    one draw as one batch would, so deterministic schedulers (DDIM, DPM-Solver++, Euler, Heun, EDM) give the same
    images; a stochastic step (DDPM's ancestral step) draws its noise per batch, so those images differ from one batch's.
    Equal up to float rounding: kernels may sum in another order for another batch size.
    """
    if isinstance(generator, list) and len(generator) != images:
        raise ValueError(f"`generator` is a list of {len(generator)}; it must have one per image ({images}).")
    config = pipe.transformer.config
    if latents is None and not isinstance(generator, list):
        shape = (images, config.in_channels, config.sample_size, config.sample_size)
        latents = randn_tensor(shape, generator=generator, device=pipe._execution_device, dtype=torch.float32)
    output_type, return_dict = call.pop("output_type"), call.pop("return_dict")
    outputs = []
    starts = range(0, images, max_batch_size)
    for start in pipe.progress_bar(starts):
        part = slice(start, start + max_batch_size)
        size = len(range(images)[part])
        outputs.append(
            pipe(
                class_labels=None if labels is None else labels[part],
                num_images_per_label=1 if labels is not None else size,
                generator=generator[part] if isinstance(generator, list) else generator,
                latents=None if latents is None else latents[part],
                output_type=output_type,
                return_dict=False,
                **call,
            )[0]
        )
    if output_type == "pil":
        joined = [image for part in outputs for image in part]
    elif output_type == "np":
        joined = np.concatenate(outputs)
    else:
        joined = torch.cat(outputs)
    if not return_dict:
        return (joined,)
    return ImagePipelineOutput(images=joined)
