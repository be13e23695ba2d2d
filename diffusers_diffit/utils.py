"""Small helpers shared across the package: input checks (every bad input is a `ValueError` naming the argument),
the dtype names of the command lines, the VAE's scale factor."""

import math
import numbers

import torch


# `--dtype` of every script: name -> torch dtype. `dtype_name` also takes torch's spelling ("float16"), which
# examples/precompute_latents.py took before.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def check_timestep(timestep: torch.Tensor | float | int, batch: int, device: torch.device) -> torch.Tensor:
    """A number, a 0-d/[1] tensor or a [batch] tensor -> [batch] tensor on `device`."""
    timestep = torch.as_tensor(timestep, device=device)
    if timestep.ndim == 0 or timestep.shape == (1,):
        return timestep.reshape(1).expand(batch)
    if timestep.shape != (batch,):
        raise ValueError(
            f"`timestep` must be a number or have shape ({batch},) to match the batch, "
            f"got shape {tuple(timestep.shape)}."
        )
    return timestep


def check_class_labels(
    class_labels: torch.Tensor | int | list[int] | None, batch: int, num_classes: int, device: torch.device
) -> torch.Tensor | None:
    """Labels -> int64 [batch] in [0, num_classes] (num_classes = the null class), or None for unconditional."""
    if class_labels is None:
        return None
    if num_classes == 0:
        raise ValueError("`class_labels` were given but this model is unconditional (num_classes=0); pass None.")
    class_labels = torch.as_tensor(class_labels, device=device)
    if class_labels.is_floating_point() or class_labels.is_complex():
        raise ValueError(f"`class_labels` must be integers, got dtype {class_labels.dtype}.")
    class_labels = class_labels.long()
    if class_labels.ndim == 0 or class_labels.shape == (1,):
        class_labels = class_labels.reshape(1).expand(batch)
    if class_labels.shape != (batch,):
        raise ValueError(
            f"`class_labels` must have shape ({batch},) to match the batch, got shape {tuple(class_labels.shape)}."
        )
    if not torch.compiler.is_compiling():
        low, high = int(class_labels.min()), int(class_labels.max())
        if low < 0 or high > num_classes:
            raise ValueError(
                f"`class_labels` must lie in [0, {num_classes}] ({num_classes} = null class), "
                f"got values in [{low}, {high}]."
            )
    return class_labels


def resolve_dtype(dtype: torch.dtype | None, torch_dtype: torch.dtype | None) -> torch.dtype | None:
    """`dtype=` and `torch_dtype=` are one option (diffusers accepts both spellings); giving two different ones is an
    error."""
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"`dtype` ({dtype}) and `torch_dtype` ({torch_dtype}) disagree; pass one of them.")
    for value in (dtype, torch_dtype):
        if value is not None and not isinstance(value, torch.dtype):
            raise ValueError(f"`dtype` must be a torch.dtype such as torch.float16, got {value!r}.")
    return dtype if dtype is not None else torch_dtype


def is_finite_number(value) -> bool:
    """A real number (int, float, numpy scalar; not a bool) that is neither NaN nor infinite."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def dtype_name(text: str) -> str:
    """A `--dtype` value -> its key in `DTYPES` ("float16" -> "fp16"); other text is returned as given, for
    argparse's `choices=sorted(DTYPES)` to reject with the list of names (use as `type=dtype_name`)."""
    return _DTYPE_ALIASES.get(text, text)


def vae_scale_factor(vae) -> int:
    """Image side / latent side of an `AutoencoderKL` (1 for None: pixel space)."""
    return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)


def normalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents -> the diffusion model's: (z − shift_factor) · scaling_factor (`shift_factor` None = 0, as in the
    SD-VAE's config)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def denormalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of `normalize_latents`: the diffusion model's latents -> what the VAE decodes."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return latents / vae.config.scaling_factor + shift
