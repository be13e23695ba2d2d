"""Which schedulers can drive a DiffiT denoiser, and the named presets the CLI and the Space offer.

A DiffiT denoiser was trained for one of two parametrisations, recorded as the pipeline's `denoiser_type`:

    "ddpm"  discrete-time ε-prediction (plus the learned-range variance when out_channels = 2·in_channels), called
            with training timesteps t ∈ [0, T); the released latent ImageNet models.
    "edm"   EDM-preconditioned F_θ (Karras et al. 2022), called with c_noise = ln(σ)/4 on c_in·x; the image-space
            models (`diffusers_diffit.edm`).

A scheduler drives a denoiser only when it calls the model with the same timestep convention and reads its output
the same way; any other pairing samples noise without an error. `check_scheduler` is the gate the pipeline applies
when a scheduler is assigned and when it samples; `scheduler_support` gives the verdict for any scheduler class, and
`compatibility_table` the table of docs/schedulers.md built from it.
"""

import difflib
import inspect

import diffusers
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .scheduling_edm_heun import EDMHeunScheduler


DENOISER_TYPES = ("ddpm", "edm")

# Schedulers verified to drive each denoiser type (tests/test_scheduler_compatibility.py samples a Gaussian data set
# through each with the analytic optimal denoiser and checks the sample statistics).
COMPATIBLE = {
    "edm": ("EDMHeunScheduler", "EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"),
    "ddpm": (
        "DDPMScheduler",
        "DDPMParallelScheduler",
        "DDIMScheduler",
        "DDIMParallelScheduler",
        "PNDMScheduler",
        "DEISMultistepScheduler",
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "UniPCMultistepScheduler",
        "SASolverScheduler",
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "HeunDiscreteScheduler",
        "KDPM2DiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "LMSDiscreteScheduler",
    ),
}

# Why the others cannot: (reason, class names). Every class not listed anywhere is "made for another model family".
_REJECTED = (
    ("inverts images to noise, it does not sample", ("DDIMInverseScheduler", "DPMSolverMultistepInverseScheduler")),
    (
        "needs a consistency-distilled model",
        ("LCMScheduler", "TCDScheduler", "CMStochasticIterativeScheduler", "SCMScheduler", "FlowMatchLCMScheduler"),
    ),
    (
        "flow matching: reads the output as a velocity",
        (
            "FlowMatchEulerDiscreteScheduler",
            "FlowMatchHeunDiscreteScheduler",
            "FlowMapEulerDiscreteScheduler",
            "LTXEulerAncestralRFScheduler",
        ),
    ),
    ("needs the `torchsde` package and re-draws Brownian noise per call; not verified", ("DPMSolverSDEScheduler",)),
    ("variance-exploding score model (NCSN++) sampler", ("ScoreSdeVeScheduler", "KarrasVeScheduler")),
    ("inpainting: needs a known image and a mask", ("RePaintScheduler",)),
    ("v-prediction video models (CogVideoX)", ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler")),
    ("cosine-schedule v-prediction models (Stable Audio)", ("CosineDPMSolverMultistepScheduler",)),
)
# How each denoiser type is called and read; a scheduler of the other type does it the other way.
_FAMILY = {
    "edm": "EDM σ-space: calls the model with c_noise = ln(σ)/4 and reads EDM-preconditioned F_θ",
    "ddpm": "discrete-time: calls the model with timesteps 0…T−1 and reads ε",
}

# Named presets: name -> (denoiser type, scheduler class name, config overrides, description). The first of each
# type is that type's default.
PRESETS = {
    "edm-heun": ("edm", "EDMHeunScheduler", {}, "EDM's 2nd-order Heun (2N − 1 model calls), the paper's sampler"),
    "edm-euler": ("edm", "EDMEulerScheduler", {}, "EDM Euler, 1st order (N calls)"),
    "edm-dpmsolver": (
        "edm",
        "EDMDPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
        "DPM-Solver++(2M) in EDM σ-space (N calls)",
    ),
    "edm-dpmsolver-3m": (
        "edm",
        "EDMDPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 3},
        "DPM-Solver++(3M) in EDM σ-space (N calls)",
    ),
    "edm-sde-dpmsolver": (
        "edm",
        "EDMDPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
        "SDE-DPM-Solver++(2M) in EDM σ-space, stochastic (N calls)",
    ),
    "ddpm": ("ddpm", "DDPMScheduler", {}, "ancestral DDPM with the learned variance, the official sampler"),
    "ddim": ("ddpm", "DDIMScheduler", {}, "DDIM, deterministic"),
    "dpmsolver": (
        "ddpm",
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
        "DPM-Solver++(2M)",
    ),
    "dpmsolver-sde": (
        "ddpm",
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
        "SDE-DPM-Solver++(2M), stochastic",
    ),
    "unipc": ("ddpm", "UniPCMultistepScheduler", {}, "UniPC (bh2)"),
    "euler": ("ddpm", "EulerDiscreteScheduler", {}, "Euler"),
    "euler-ancestral": ("ddpm", "EulerAncestralDiscreteScheduler", {}, "Euler ancestral, stochastic"),
    "heun": ("ddpm", "HeunDiscreteScheduler", {}, "Heun, 2nd order (2N − 1 model calls)"),
}


def scheduler_class(name: str) -> type[SchedulerMixin]:
    """A scheduler class by its class name: this package's `EDMHeunScheduler` or one of diffusers'."""
    if name == "EDMHeunScheduler":
        return EDMHeunScheduler
    return getattr(diffusers, name)


def scheduler_support(scheduler_cls: type, denoiser_type: str) -> str | None:
    """None when `scheduler_cls` drives a `denoiser_type` denoiser, else the reason it cannot (one short phrase)."""
    _check_denoiser_type(denoiser_type)
    name = scheduler_cls.__name__
    if name in COMPATIBLE[denoiser_type]:
        return None
    for other in DENOISER_TYPES:
        if name in COMPATIBLE[other]:
            return _FAMILY[other]
    for reason, names in _REJECTED:
        if name in names:
            return reason
    return "made for another model family"


def check_scheduler(scheduler: SchedulerMixin, denoiser_type: str, current: SchedulerMixin | None = None):
    """The scheduler to use for a `denoiser_type` denoiser: `scheduler` itself, or a faithful copy of it; raises
    `ValueError` naming the scheduler and listing the ones that work when it cannot drive the model.

    `current` is the scheduler being replaced (it defines the model's noise schedule): a discrete-time scheduler must
    keep its training noise schedule (betas, T), an EDM one its σ_data. The one adaptation made: a non-DDPM scheduler
    configured with a learned variance type (carried over by `from_config` from the DDPM one) gets
    `variance_type=None`, since diffusers' DPM-Solver / SA-Solver would otherwise keep only 3 output channels; the
    pipeline drops the learned variance itself for every scheduler but DDPM's.
    """
    reason = scheduler_support(type(scheduler), denoiser_type)
    if reason is not None:
        raise ValueError(
            f"{type(scheduler).__name__} cannot drive this model ({reason}); the model is a {denoiser_type!r} "
            f"denoiser ({_FAMILY[denoiser_type]}). Schedulers that work: "
            f"{', '.join(COMPATIBLE[denoiser_type])}; e.g. `pipe.scheduler = "
            f"{COMPATIBLE[denoiser_type][1]}.from_config(pipe.scheduler.config)`."
        )
    config = scheduler.config
    prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(
            f"{type(scheduler).__name__} has `prediction_type={prediction!r}`, but this {denoiser_type!r} model is "
            "read as 'epsilon' (ε, or EDM's F_θ); use prediction_type='epsilon'."
        )
    if current is not None and scheduler_support(type(current), denoiser_type) is None:
        keys = ("sigma_data",) if denoiser_type == "edm" else _NOISE_SCHEDULE_KEYS
        changed = {k: (current.config.get(k), config.get(k)) for k in keys if current.config.get(k) != config.get(k)}
        if changed:
            detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ValueError(
                f"{type(scheduler).__name__} changes the noise schedule the model was trained with ({detail}); build "
                f"it with `{type(scheduler).__name__}.from_config(pipe.scheduler.config)`."
            )
    takes_variance_type = "variance_type" in inspect.signature(type(scheduler).__init__).parameters
    ddpm_family = type(scheduler).__name__ in ("DDPMScheduler", "DDPMParallelScheduler")
    if takes_variance_type and not ddpm_family and config.variance_type in ("learned", "learned_range"):
        scheduler = type(scheduler).from_config(config, variance_type=None)
    return scheduler


_NOISE_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")


def infer_denoiser_type(scheduler_class_name: str) -> str:
    """The denoiser type a pipeline saved without `denoiser_type` was made for, from its scheduler's class name:
    EDM σ-space schedulers mean "edm", everything else "ddpm"."""
    return "edm" if scheduler_class_name in COMPATIBLE["edm"] else "ddpm"


def scheduler_presets(denoiser_type: str) -> list[str]:
    """The preset names that drive a `denoiser_type` denoiser, its default first."""
    _check_denoiser_type(denoiser_type)
    return [name for name, (kind, *_) in PRESETS.items() if kind == denoiser_type]


def scheduler_from_preset(name: str, current: SchedulerMixin, denoiser_type: str | None = None) -> SchedulerMixin:
    """A new scheduler of preset `name`, built from `current`'s config (the model's noise schedule) and checked with
    `check_scheduler`. `denoiser_type` defaults to the one `current` implies."""
    denoiser_type = denoiser_type or infer_denoiser_type(type(current).__name__)
    allowed = scheduler_presets(denoiser_type)
    if name not in allowed:
        close = difflib.get_close_matches(str(name), allowed, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"Scheduler {name!r} is not one of {allowed} (the ones for this {denoiser_type} model).{hint}"
        )
    _, class_name, overrides, _ = PRESETS[name]
    scheduler = scheduler_class(class_name).from_config(current.config, **overrides)
    return check_scheduler(scheduler, denoiser_type, current)


def all_scheduler_classes() -> list[type[SchedulerMixin]]:
    """Every scheduler class diffusers exports (PyTorch ones), plus this package's `EDMHeunScheduler`."""
    names = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("Flax"))
    return [EDMHeunScheduler, *(getattr(diffusers, n) for n in names)]


def compatibility_table() -> str:
    """The markdown table of every scheduler × denoiser type: "works" or the reason it is rejected."""
    rows = ["| scheduler | latent ImageNet (`ddpm`) | image-space EDM (`edm`) |", "|---|---|---|"]
    for cls in all_scheduler_classes():
        cells = [scheduler_support(cls, kind) for kind in DENOISER_TYPES]
        rows.append(f"| `{cls.__name__}` | " + " | ".join("**works**" if c is None else c for c in cells) + " |")
    return "\n".join(rows)


def _check_denoiser_type(denoiser_type: str) -> None:
    if denoiser_type not in DENOISER_TYPES:
        raise ValueError(f"`denoiser_type` must be one of {DENOISER_TYPES}, got {denoiser_type!r}.")
