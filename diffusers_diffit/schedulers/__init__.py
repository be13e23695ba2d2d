from .compatibility import (
    DENOISER_TYPES,
    PRESETS,
    check_scheduler,
    compatibility_table,
    infer_denoiser_type,
    scheduler_from_preset,
    scheduler_presets,
    scheduler_support,
)
from .scheduling_edm_heun import EDMHeunScheduler, EDMHeunSchedulerOutput


__all__ = [
    "DENOISER_TYPES",
    "PRESETS",
    "EDMHeunScheduler",
    "EDMHeunSchedulerOutput",
    "check_scheduler",
    "compatibility_table",
    "infer_denoiser_type",
    "scheduler_from_preset",
    "scheduler_presets",
    "scheduler_support",
]
