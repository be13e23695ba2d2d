"""Classifier-free guidance as DiffiT samples with it (SPEC.md §3): a weight w(t) per step, applied to the leading
latent channels only.

    ε̃[:, :g] = ε_u[:, :g] + w(t)·(ε_c[:, :g] − ε_u[:, :g]),   ε̃[:, g:] = ε_c[:, g:]

    "constant":      w(t) = w
    "power-cosine":  w(t) = 1 + (w − 1)·½·(1 − cos(π·(1 − t/T)^p)),  t the training timestep, T the training horizon

The released 256-px model uses power-cosine with w = 4.4, p = 4 and g = 3 of its 4 latent channels; the 512-px model
constant w = 1.49, g = 3.
"""

import math

import torch

from .utils import is_finite_number


GUIDANCE_SCHEDULES = ("constant", "power-cosine")


def check_guidance_recipe(
    guidance_scale: float,
    guidance_schedule: str,
    guidance_power: float,
    guided_channels: int | None,
    guidance_interval: tuple[float, float] | list[float] | str | None,
    in_channels: int,
) -> dict:
    """Validate a guidance recipe; returns it normalised (numbers as floats/ints, the interval as a list or None)."""
    if not is_finite_number(guidance_scale) or guidance_scale < 1:
        raise ValueError(f"`guidance_scale` must be a finite number >= 1 (1 = no guidance), got {guidance_scale!r}.")
    if guidance_schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(f"`guidance_schedule` must be one of {GUIDANCE_SCHEDULES}, got {guidance_schedule!r}.")
    if not is_finite_number(guidance_power) or guidance_power <= 0:
        raise ValueError(f"`guidance_power` must be a finite number > 0, got {guidance_power!r}.")
    if guided_channels is not None and (
        isinstance(guided_channels, bool) or not isinstance(guided_channels, int) or not 1 <= guided_channels <= in_channels
    ):
        raise ValueError(
            f"`guided_channels` must be None (all) or an int in [1, {in_channels}] (the model's in_channels), "
            f"got {guided_channels!r}."
        )
    if isinstance(guidance_interval, str) and guidance_interval == "all":  # every step, overriding a saved interval
        guidance_interval = None
    if guidance_interval is not None:
        if (
            not isinstance(guidance_interval, (tuple, list))
            or len(guidance_interval) != 2
            or not all(is_finite_number(x) for x in guidance_interval)
            or guidance_interval[0] > guidance_interval[1]
        ):
            raise ValueError(
                f"`guidance_interval` must be None, 'all' or (t_low, t_high) with finite t_low <= t_high, got "
                f"{guidance_interval!r}."
            )
        guidance_interval = [float(x) for x in guidance_interval]
    return dict(
        guidance_scale=float(guidance_scale),
        guidance_schedule=guidance_schedule,
        guidance_power=float(guidance_power),
        guided_channels=guided_channels,
        guidance_interval=guidance_interval,
    )


def training_horizon(scheduler) -> int:
    """T of a discrete-time scheduler, whose timesteps are training steps indexing its `alphas_cumprod` (DDPM, DDIM,
    DPM-Solver, Euler, …). Continuous-time schedulers (EDM: timesteps are c_noise = ln(σ)/4) have none."""
    horizon = getattr(scheduler.config, "num_train_timesteps", None)
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if horizon is None or alphas_cumprod is None or len(alphas_cumprod) != horizon:
        raise ValueError(
            f"`guidance_schedule='power-cosine'` needs a discrete-time scheduler (training timesteps 0…T-1 with "
            f"`config.num_train_timesteps` = T), but {type(scheduler).__name__} has none; use "
            f"`guidance_schedule='constant'` with this scheduler."
        )
    return horizon


def guidance_weight(
    timestep: float, guidance_scale: float, guidance_schedule: str, guidance_power: float, horizon: int | None = None
) -> float:
    """w(t) of the schedule (see the module docstring); `horizon` = T is needed by "power-cosine"."""
    if guidance_schedule == "constant":
        return guidance_scale
    if guidance_schedule == "power-cosine":
        if horizon is None:
            raise ValueError("`horizon` (the scheduler's num_train_timesteps) is required for 'power-cosine'.")
        ramp = 0.5 * (1 - math.cos(math.pi * (1 - timestep / horizon) ** guidance_power))
        return 1 + (guidance_scale - 1) * ramp
    raise ValueError(f"`guidance_schedule` must be one of {GUIDANCE_SCHEDULES}, got {guidance_schedule!r}.")


def apply_guidance(cond: torch.Tensor, uncond: torch.Tensor, weight: float, guided_channels: int) -> torch.Tensor:
    """Guide the first `guided_channels` channels of the conditional output [B, C_out, H, W]; every other channel
    (the rest of ε, the learned variance) is the conditional output's own."""
    g = guided_channels
    guided = uncond[:, :g] + weight * (cond[:, :g] - uncond[:, :g])
    return torch.cat([guided, cond[:, g:]], dim=1)
