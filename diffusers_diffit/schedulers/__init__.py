from .scheduling_edm_heun import EDMHeunScheduler, EDMHeunSchedulerOutput

__all__ = ["EDMHeunScheduler", "EDMHeunSchedulerOutput"]
