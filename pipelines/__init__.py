from .pipeline_diffit import OFFICIAL_RECIPES, RECIPE_KEYS, DiffiTPipeline, official_scheduler


__all__ = ["OFFICIAL_RECIPES", "RECIPE_KEYS", "DiffiTPipeline", "official_scheduler"]
