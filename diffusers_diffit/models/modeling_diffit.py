"""DiffiTModelMixin: what both DiffiT models share on top of diffusers' `ModelMixin`."""

import contextlib
import os

from ..file_checks import check_component_folder
from .attention import DiffiTAttention
from .attention_backends import check_attention_backend
from .attention_processor import DiffiTAttnProcessor, DiffiTInferenceAttnProcessor, clear_derived_tensors


class DiffiTModelMixin:
    """What both DiffiT models share on top of diffusers' `ModelMixin`:

    - `set_attention_backend` checks the backend at the door, against the model's device and dtype, and every move
      (`.to()`, `.cuda()`, `.half()` …) checks a backend that was set again; forwards do not check it again. A
      model moved where its backend cannot run raises a `ValueError` (the move itself has happened): pick a backend
      that runs on both devices ('native' runs everywhere) before moving it, e.g. for `enable_model_cpu_offload`.
    - `from_pretrained` checks a local folder before diffusers builds anything from it (`check_component_folder`): a
      truncated safetensors file or a config.json entry of the wrong type is a `ValueError` naming the file and the
      fix.
    - `inference_cache()`: a block in which the attention modules that use the plain `DiffiTAttnProcessor` use
      `DiffiTInferenceAttnProcessor` instead, which computes tensors derived from the weights alone (gathered bias,
      packed CPU weights) once and reuses them; they are also dropped on every move and every `train()` / `eval()`.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """`ModelMixin.from_pretrained`, a local folder checked first (`check_component_folder`)."""
        folder = os.path.join(os.fspath(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        if os.path.isdir(folder):
            check_component_folder(folder, cls, "download the model again (force_download=True) or save it again")
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @contextlib.contextmanager
    def inference_cache(self):
        """Eval-mode, no-grad forwards inside this block reuse what depends on the weights alone (the gathered
        position bias; on the CPU in float32 the oneDNN-packed linear weights), which is dropped when the block ends.
        `DiffiTPipeline` runs each call in one. Changes to the weights inside the block are seen when they go through
        autograd's version counter (`load_state_dict`, optimizer steps, in-place ops), not through `.data`: change
        weights between blocks. A custom processor set with `set_attn_processor` is left in place."""
        if self.__dict__.get("_inference_cache"):  # nested: the outer block owns it
            yield self
            return
        plain = [
            m for m in self.modules() if isinstance(m, DiffiTAttention) and type(m.processor) is DiffiTAttnProcessor
        ]
        for module in plain:
            module.set_processor(DiffiTInferenceAttnProcessor.like(module.processor))
        self.__dict__["_inference_cache"] = True
        try:
            yield self
        finally:
            del self.__dict__["_inference_cache"]
            for module in plain:
                module.set_processor(DiffiTAttnProcessor.like(module.processor))
            clear_derived_tensors(self)

    def set_attention_backend(self, backend: str) -> None:
        check_attention_backend(backend, self.device, self.dtype)
        super().set_attention_backend(backend)

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        clear_derived_tensors(self)
        for backend in {p._attention_backend for p in self.attn_processors.values()} - {None}:
            check_attention_backend(backend, self.device, self.dtype)
        return module

    def train(self, mode: bool = True):
        clear_derived_tensors(self)
        return super().train(mode)
