"""Classifier-free guidance as DiffiT samples with it (docs/diffit-equations.md#guidance): a weight w(t) per step,
applied to the leading latent channels only.

    ε̃[:, :g] = ε_u[:, :g] + w(t)·(ε_c[:, :g] − ε_u[:, :g]),   ε̃[:, g:] = ε_c[:, g:]

w(t) comes from a guidance schedule, looked up by name in `GUIDANCE_SCHEDULES`:

    "constant":      w(t) = w
    "power-cosine":  w(t) = 1 + (w − 1)·½·(1 − cos(π·(1 − t/T)^p)),  t the training timestep, T the training horizon

The released 256-px model uses power-cosine with w = 4.4, p = 4 and g = 3 of its 4 latent channels; the 512-px model
constant w = 1.49, g = 3. A new schedule is one `register_guidance_schedule(GuidanceSchedule(...))`: the pipeline,
the `diffit` command, the Space and the scripts read their choices, help text and checks from the registry.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .utils import is_finite_number


@dataclass(frozen=True)
class GuidanceSchedule:
    """A guidance schedule: `weight(timestep, guidance_scale, guidance_power, horizon)` -> w(t), where `horizon` is
    the training horizon T of a discrete-time scheduler when `needs_discrete_time` (None otherwise); `description`
    is one line for help texts and model cards, in the symbols w, p, t and T."""

    name: str
    weight: Callable[[float, float, float, int | None], float]
    needs_discrete_time: bool
    description: str


# name -> schedule; `register_guidance_schedule` adds to it
GUIDANCE_SCHEDULES: dict[str, GuidanceSchedule] = {}


def register_guidance_schedule(schedule: GuidanceSchedule) -> GuidanceSchedule:
    """Make `schedule` available under `schedule.name` everywhere a guidance schedule is chosen."""
    if schedule.name in GUIDANCE_SCHEDULES:
        raise ValueError(
            f"A guidance schedule named {schedule.name!r} is already registered; registered: "
            f"{tuple(GUIDANCE_SCHEDULES)}."
        )
    GUIDANCE_SCHEDULES[schedule.name] = schedule
    return schedule


def constant_weight(timestep: float, guidance_scale: float, guidance_power: float, horizon: int | None) -> float:
    return guidance_scale


def power_cosine_weight(timestep: float, guidance_scale: float, guidance_power: float, horizon: int | None) -> float:
    ramp = 0.5 * (1 - math.cos(math.pi * (1 - timestep / horizon) ** guidance_power))
    return 1 + (guidance_scale - 1) * ramp


register_guidance_schedule(
    GuidanceSchedule("constant", constant_weight, needs_discrete_time=False, description="w(t) = w at every step")
)
register_guidance_schedule(
    GuidanceSchedule(
        "power-cosine",
        power_cosine_weight,
        needs_discrete_time=True,
        description="w(t) = 1 + (w − 1)·½·(1 − cos(π·(1 − t/T)^p)), rising from 1 at t = T to w at t = 0",
    )
)


def get_guidance_schedule(guidance_schedule: str) -> GuidanceSchedule:
    """The registered schedule of that name; a `ValueError` listing the registered names otherwise."""
    if not isinstance(guidance_schedule, str) or guidance_schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(f"`guidance_schedule` must be one of {tuple(GUIDANCE_SCHEDULES)}, got {guidance_schedule!r}.")
    return GUIDANCE_SCHEDULES[guidance_schedule]


def usable_guidance_schedules(discrete_time: bool) -> list[str]:
    """Names of the schedules that a discrete-time (or, with False, a continuous-time) scheduler can drive."""
    return [name for name, schedule in GUIDANCE_SCHEDULES.items() if discrete_time or not schedule.needs_discrete_time]


def describe_guidance_schedules(names: list[str] | None = None) -> str:
    """The schedules `names` (default: all) as "name: description; ...", for help texts."""
    schedules = [GUIDANCE_SCHEDULES[name] for name in names] if names is not None else GUIDANCE_SCHEDULES.values()
    return "; ".join(
        f"{s.name}: {s.description}" + (" (discrete-time schedulers)" if s.needs_discrete_time else "")
        for s in schedules
    )


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
    get_guidance_schedule(guidance_schedule)
    if not is_finite_number(guidance_power) or guidance_power <= 0:
        raise ValueError(f"`guidance_power` must be a finite number > 0, got {guidance_power!r}.")
    if guided_channels is not None and (
        isinstance(guided_channels, bool)
        or not isinstance(guided_channels, int)
        or not 1 <= guided_channels <= in_channels
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


def training_horizon(scheduler) -> int | None:
    """T of a discrete-time scheduler, whose timesteps are training steps indexing its `alphas_cumprod` (DDPM, DDIM,
    DPM-Solver, Euler, …); None for continuous-time schedulers (EDM: timesteps are c_noise = ln(σ)/4)."""
    horizon = getattr(scheduler.config, "num_train_timesteps", None)
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if horizon is None or alphas_cumprod is None or len(alphas_cumprod) != horizon:
        return None
    return horizon


def schedule_horizon(guidance_schedule: str, scheduler) -> int | None:
    """The `horizon` that `guidance_schedule`'s w(t) reads with `scheduler`: its training horizon T when the schedule
    needs a discrete-time scheduler, else None. A `ValueError` when it needs one and `scheduler` is not."""
    if not get_guidance_schedule(guidance_schedule).needs_discrete_time:
        return None
    horizon = training_horizon(scheduler)
    if horizon is None:
        usable = " or ".join(f"`guidance_schedule={name!r}`" for name in usable_guidance_schedules(False))
        raise ValueError(
            f"`guidance_schedule={guidance_schedule!r}` needs a discrete-time scheduler (training timesteps 0…T-1 "
            f"with `config.num_train_timesteps` = T), but {type(scheduler).__name__} has none; use {usable} with "
            "this scheduler."
        )
    return horizon


def guidance_weight(
    timestep: float, guidance_scale: float, guidance_schedule: str, guidance_power: float, horizon: int | None = None
) -> float:
    """w(t) of the schedule (see `GUIDANCE_SCHEDULES`); `horizon` = T is needed by schedules that read t/T."""
    schedule = get_guidance_schedule(guidance_schedule)
    if schedule.needs_discrete_time and horizon is None:
        raise ValueError(f"`horizon` (the scheduler's num_train_timesteps) is required for {guidance_schedule!r}.")
    return schedule.weight(timestep, guidance_scale, guidance_power, horizon)


def apply_guidance(cond: torch.Tensor, uncond: torch.Tensor, weight: float, guided_channels: int) -> torch.Tensor:
    """Guide the first `guided_channels` channels of the conditional output [B, C_out, H, W]; every other channel
    (the rest of ε, the learned variance) is the conditional output's own."""
    g = guided_channels
    guided = uncond[:, :g] + weight * (cond[:, :g] - uncond[:, :g])
    return torch.cat([guided, cond[:, g:]], dim=1)


# ---------------------------------------------------------------------------------------------------------------
# diffusers' guiders (`diffusers.guiders`) in place of the recipe above

# The predictions a class-conditional DiffiT makes for a guider, by the names guiders give them.
GUIDER_PREDICTIONS = {
    "pred_cond": "the class labels",
    "pred_uncond": "the null class",
    "pred_cond_skip": "the class labels, with whole transformer blocks skipped (SkipLayerGuidance)",
}
# Where guiders that perturb the model keep the blocks they hook (`LayerSkipConfig` / `SmoothedEnergyGuidanceConfig`).
# Only whole-block skips reach DiffiT's blocks: in inference the block runs its MLP (and attention) through the
# attention processor's own kernels, past the hooks diffusers puts on the `ff` / attention submodules.
GUIDER_LAYER_CONFIGS = ("skip_layer_config", "auto_guidance_config", "seg_guidance_config")


def check_guider(guider, transformer) -> None:
    """Raise a `ValueError` naming the guider and what is missing unless `DiffiTPipeline` can drive `guider` with
    `transformer`: a `diffusers.guiders.BaseGuidance` whose predictions are all in `GUIDER_PREDICTIONS`, on a
    class-conditional model, skipping whole `transformer_blocks.N` that exist. None (DiffiT's recipe) always passes.
    A layer config whose `indices` is a bare int (what diffusers 0.42's `skip_layer_guidance_layers=` / `auto_guidance_
    layers=` build, and its own hooks cannot iterate) is made a list in place."""
    from diffusers.guiders import BaseGuidance
    from diffusers.hooks import LayerSkipConfig

    if guider is None:
        return
    if not isinstance(guider, BaseGuidance):
        raise ValueError(
            f"`guider` must be None (DiffiT's guidance recipe) or a diffusers guider (`diffusers.guiders`), got "
            f"{type(guider).__name__}."
        )
    name = type(guider).__name__
    unknown = [p for p in guider._input_predictions if p not in GUIDER_PREDICTIONS]
    if unknown:
        makes = "; ".join(f"{k}: {v}" for k, v in GUIDER_PREDICTIONS.items())
        raise ValueError(
            f"{name} needs the predictions {unknown}, which DiffiTPipeline cannot make: its model is conditioned on "
            f"a class label alone, and it makes {makes}."
        )
    if transformer.config.num_classes == 0:
        raise ValueError(
            f"{name} guides with unconditional predictions, but this model is unconditional (num_classes=0); use "
            "`guider=None`."
        )
    configs = [c for attribute in GUIDER_LAYER_CONFIGS for c in getattr(guider, attribute, None) or []]
    if not configs:
        return
    blocks = getattr(transformer, "transformer_blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise ValueError(
            f"{name} hooks transformer blocks (`transformer_blocks.N`), which {type(transformer).__name__} does not "
            "have; use a guider that does not perturb the model (ClassifierFreeGuidance, "
            "ClassifierFreeZeroStarGuidance, AdaptiveProjectedGuidance, ...) or DiffiTTransformer2DModel."
        )
    for config in configs:
        whole_blocks = isinstance(config, LayerSkipConfig) and config.skip_attention and config.skip_ff
        if not whole_blocks or config.skip_attention_scores:
            raise ValueError(
                f"{name} perturbs parts of blocks ({type(config).__name__}: attention, attention scores or the MLP), "
                "which DiffiT's blocks do not expose to diffusers' hooks; skip whole blocks instead "
                "(`LayerSkipConfig(indices, skip_attention=True, skip_ff=True)`, SkipLayerGuidance's default)."
            )
        # diffusers 0.42's `*_layers=` form stores a bare int, which its own hooks cannot iterate
        if isinstance(config.indices, int):
            config.indices = [config.indices]
        if config.fqn not in ("auto", "transformer_blocks"):
            raise ValueError(
                f"{name} hooks blocks under {config.fqn!r}; DiffiT's blocks are `transformer_blocks` (fqn='auto' or "
                "'transformer_blocks')."
            )
        outside = [i for i in config.indices if not 0 <= i < len(blocks)]
        if outside:
            raise ValueError(
                f"{name} hooks transformer blocks {outside}, but this model has blocks 0…{len(blocks) - 1} "
                f"(num_layers={len(blocks)})."
            )
    from .models.cache import register_diffit_block  # here: remote code without the package can still guide

    register_diffit_block()
