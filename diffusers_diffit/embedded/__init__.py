"""Pipelines shipped inside the package, so the package samples real images offline with no download.

- "digits": a class-conditional `DiffiTUNet2DModel` (0.76 M parameters, 16×16, one channel) trained on
  scikit-learn's digits with the EDM recipe by `examples/train_diffit.py @examples/digits.args`
  (`examples/prepare_digits.py`). Default recipe (`benchmarks/nfe_study.py`):
  diffusers' `EDMDPMSolverMultistepScheduler` (DPM-Solver++ 2M), 12 model calls, guidance 1.25 only at noise levels
  σ in [0.28, 5.42] (`guidance_interval` in the scheduler's c_noise = ln(σ)/4 units). The recipe it was released with,
  `EDMHeunScheduler` with 18 steps (35 calls) and guidance at every step, is still selectable (see
  docs/digits-benchmarks.md).

- "digits-latent": a class-conditional latent `DiffiTTransformer2DModel` (1.29 M parameters, learned variance) on
  the 4×4×4 latents of its own `AutoencoderKL` (0.32 M parameters, 32×32 images, factor 8), trained with NVIDIA's
  ddpm-hybrid objective by `make digits-latent` (`examples/digits_vae.args`, `examples/digits_latent.args`; see
  docs/digits-latent.md). Sampled with NVIDIA's sampler (learned-range DDPM) or its faster saved recipe.

    from diffusers_diffit import DiffiTPipeline, embedded_model_path
    pipe = DiffiTPipeline.from_pretrained(embedded_model_path("digits"))
"""

from pathlib import Path


EMBEDDED_MODELS = ("digits", "digits-latent")


def embedded_model_path(name: str = "digits") -> str:
    """The local folder of the shipped pipeline `name` (one of `EMBEDDED_MODELS`), for `from_pretrained`."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"`name` must be one of {EMBEDDED_MODELS}, got {name!r}.")
    path = Path(__file__).parent / name
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"The embedded model {name!r} is missing from this installation ({path}).")
    return str(path)
