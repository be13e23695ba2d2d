"""Where a latent digits denoiser errs, by timestep: the ε-MSE of DDPM (ε-predicting) pipelines, of EDM pipelines
(their D(x; σ) turned into ε), and of the best Gaussian guess, on noised latents of the real training digits.

    python -m benchmarks.denoiser_error --pipelines outputs/digits-latent/pipeline outputs/edm-latent

At timestep t (DDPM's linear betas, ᾱ_t), x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·n with x0 the VAE posterior means of the
training digits (normalised latents), the same noise n for every model. Columns:
- `gauss` (on the first pipeline's latents): ε̂ = √(1 − ᾱ_t)·x_t, the best prediction for data of unit variance that knows nothing else; at high t
  it is nearly exact, so a model above it there has not learned to pass x_t through.
- per pipeline, ε-MSE and the x0-MSE of the x0 its ε implies, x̂0 = (x_t − √(1 − ᾱ_t)·ε̂)/√ᾱ_t: what the sampler
  acts on. An ε error e becomes an x0 error e·σ_t, σ_t = √((1 − ᾱ_t)/ᾱ_t), which is 12 at t = 700 and 61 at t = 900.
EDM pipelines see x_t/√ᾱ_t at σ_t (the same noisy sample in EDM's variance-exploding units).
"""

import argparse

import torch

from diffusers_diffit import DiffiTPipeline, embedded_model_path, official_scheduler
from diffusers_diffit.data.digits import LATENT_RESOLUTION, digits_split, ink_to_model
from diffusers_diffit.edm import edm_denoise
from diffusers_diffit.utils import normalize_latents


TIMESTEPS = (5, 25, 50, 100, 200, 300, 400, 500, 700, 900, 999)


@torch.no_grad()
def epsilon_prediction(pipe: DiffiTPipeline, x_t: torch.Tensor, t: int, alpha_bar: torch.Tensor, labels):
    """ε̂ of a pipeline's denoiser at x_t (DDPM units), whichever kind it is."""
    if pipe.denoiser_type == "ddpm":
        timesteps = torch.full((len(x_t),), t)
        return pipe.transformer(x_t, timesteps, class_labels=labels).sample[:, : x_t.shape[1]]
    sigma = ((1 - alpha_bar) / alpha_bar).sqrt().expand(len(x_t))
    denoised = edm_denoise(pipe.transformer, x_t / alpha_bar.sqrt(), sigma, labels, pipe.scheduler.config.sigma_data)
    return (x_t - alpha_bar.sqrt() * denoised) / (1 - alpha_bar).sqrt()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pipelines", nargs="+", default=None, help="latent digits pipelines (default: the shipped digits-latent)"
    )
    parser.add_argument("--num-samples", type=int, default=512, help="training digits noised per timestep")
    parser.add_argument("--timesteps", type=int, nargs="+", default=list(TIMESTEPS))
    parser.add_argument("--num-threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not 1 <= args.num_samples <= 1297:
        parser.error(f"--num-samples must be in [1, 1297] (the training digits), got {args.num_samples}")
    bad = [t for t in args.timesteps if not 0 <= t < 1000]
    if bad:
        parser.error(f"--timesteps must lie in [0, 999], got {bad}")
    torch.set_num_threads(args.num_threads)
    pipes = [DiffiTPipeline.from_pretrained(p) for p in args.pipelines or [embedded_model_path("digits-latent")]]
    train_ink, train_labels, _, _ = digits_split()
    pixels = ink_to_model(train_ink[: args.num_samples], LATENT_RESOLUTION)
    labels = torch.as_tensor(train_labels[: args.num_samples])
    with torch.no_grad():  # each pipeline's own latents of the same digits
        latents = [normalize_latents(p.vae, p.vae.encode(pixels).latent_dist.mean) for p in pipes]
    alphas_cumprod = official_scheduler().alphas_cumprod
    names = [f"[{i}] {p.denoiser_type}" for i, p in enumerate(pipes)]
    print("| t | σ_t | ε-MSE gauss | " + " | ".join(f"ε-MSE {n} | x0-MSE {n}" for n in names) + " |")
    print("|---:" * (3 + 2 * len(pipes)) + "|")
    for t in args.timesteps:
        alpha_bar, cells = alphas_cumprod[t], []
        for i, (pipe, x0) in enumerate(zip(pipes, latents)):
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t))
            x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
            if i == 0:
                cells.append(f"{((1 - alpha_bar).sqrt() * x_t - noise).pow(2).mean():.4f}")
            eps = epsilon_prediction(pipe, x_t, t, alpha_bar, labels)
            implied_x0 = (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
            cells += [f"{(eps - noise).pow(2).mean():.4f}", f"{(implied_x0 - x0).pow(2).mean():.4f}"]
        sigma = float(((1 - alpha_bar) / alpha_bar).sqrt())
        print(f"| {t} | {sigma:.3g} | " + " | ".join(cells) + " |")
    for i, path in enumerate(args.pipelines or ["digits-latent"]):
        print(f"\n[{i}] {path}", end="")
    print()


if __name__ == "__main__":
    main()
