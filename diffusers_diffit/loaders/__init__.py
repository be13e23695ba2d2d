from .lora_diffit import DiffiTLoraLoaderMixin


__all__ = ["DiffiTLoraLoaderMixin"]
