from .pipeline_diffit import OFFICIAL_RECIPES, DiffiTPipeline, official_scheduler


__all__ = ["OFFICIAL_RECIPES", "DiffiTPipeline", "official_scheduler"]
