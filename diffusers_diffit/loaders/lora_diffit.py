"""`DiffiTLoraLoaderMixin`: LoRA adapters for `DiffiTPipeline`'s transformer, in diffusers' LoRA format, in the shape
of diffusers' transformer-only loaders (`SanaLoraLoaderMixin`).

The file is diffusers' `pytorch_lora_weights.safetensors`: PEFT's keys prefixed "transformer."
(`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`), the `LoraConfig` in the safetensors metadata. A
fine-tune onto new classes adds the label-table rows it trained (`finetuning.class_rows_state_dict`):
`transformer.condition_embed.class_embedder.class_rows` / `.class_row_ids` / `.num_classes`.

Module names to target (`LoraConfig(target_modules=...)`, matched on the last name component):

- TMSA, spatial: `to_q`, `to_k`, `to_v` (the tokens' projections x_s·W_s) and `to_out`;
- TMSA, time token: `to_q_time`, `to_k_time`, `to_v_time` (x_t·W_t, added to the spatial ones);
- MLP: `ff.net.0.proj`, `ff.net.2`; conditioning: `condition_embed.timestep_embedder.linear_1` / `linear_2`;
  output: `proj_out`.

`["to_q", "to_k", "to_v", "to_out"]` adapts the spatial attention alone (the time projections do not match it).
"""

import logging
import os

import torch
from diffusers.loaders.lora_base import LoraBaseMixin, _fetch_state_dict
from torch import nn

from ..finetuning import class_table, load_class_rows, resize_class_embedding


logger = logging.getLogger(__name__)
CLASS_ROW_KEYS = (".class_rows", ".class_row_ids", ".num_classes")


def split_class_rows(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(LoRA tensors, label-table rows) of one adapter state dict."""
    rows = {k: v for k, v in state_dict.items() if k.endswith(CLASS_ROW_KEYS)}
    return {k: v for k, v in state_dict.items() if k not in rows}, rows


def check_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], rank: int | None = None) -> None:
    """Raise a ValueError naming every key of a (prefix-free) PEFT LoRA state dict that does not fit `model`: no
    linear layer of that name, a shape that does not fit the layer, or a rank other than `rank` (the adapter's
    `LoraConfig.r`, when known) or than its other half's."""
    modules = dict(model.named_modules())
    problems, ranks = [], {}
    for key, tensor in state_dict.items():
        name, sep, part = key.partition(".lora_")
        layer = modules.get(name) if sep else None
        layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        if not isinstance(layer, nn.Linear):
            problems.append(f"{key}: {type(model).__name__} has no linear layer {name!r}")
            continue
        expected = {
            "A.weight": (tensor.shape[0], layer.in_features),
            "B.weight": (layer.out_features, tensor.shape[-1]),
            "B.bias": (layer.out_features,),
        }.get(part)
        if expected is None or tuple(tensor.shape) != expected:
            problems.append(f"{key}: shape {tuple(tensor.shape)}, the layer needs {expected or 'lora_A / lora_B'}")
            continue
        if part != "B.bias":
            r = tensor.shape[0] if part == "A.weight" else tensor.shape[1]
            if ranks.setdefault(name, r) != r or (rank is not None and r != rank):
                problems.append(f"{key}: rank {r}, the adapter's rank is {rank or ranks[name]}")
    if problems:
        raise ValueError(
            f"The LoRA does not fit this {type(model).__name__} (another architecture, size or rank?); "
            f"{len(problems)} mismatched key(s):\n  " + "\n  ".join(problems)
        )


class DiffiTLoraLoaderMixin(LoraBaseMixin):
    """Load, save, fuse and switch LoRA adapters of [`DiffiTTransformer2DModel`] / [`DiffiTUNet2DModel`] in
    [`DiffiTPipeline`]. `fuse_lora`, `unfuse_lora`, `set_adapters`, `disable_lora`, `delete_adapters` are
    diffusers' (`LoraBaseMixin`); the runtime scale is `pipe(..., attention_kwargs={"scale": s})`.
    """

    _lora_loadable_modules = ["transformer"]
    transformer_name = "transformer"

    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict: str | os.PathLike | dict, **kwargs):
        """The adapter's tensors (and, with `return_lora_metadata=True`, its metadata) from a folder / Hub repo with
        `pytorch_lora_weights.safetensors` (or `weight_name=`), or a dict. Hub options as in diffusers."""
        return_metadata = kwargs.pop("return_lora_metadata", False)
        state_dict, metadata = _fetch_state_dict(
            pretrained_model_name_or_path_or_dict=pretrained_model_name_or_path_or_dict,
            weight_name=kwargs.pop("weight_name", None),
            use_safetensors=True,
            local_files_only=kwargs.pop("local_files_only", None),
            cache_dir=kwargs.pop("cache_dir", None),
            force_download=kwargs.pop("force_download", False),
            proxies=kwargs.pop("proxies", None),
            token=kwargs.pop("token", None),
            revision=kwargs.pop("revision", None),
            subfolder=kwargs.pop("subfolder", None),
            user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
            allow_pickle=False,
        )
        if kwargs:
            raise ValueError(f"Unexpected keyword arguments {sorted(kwargs)}.")
        return (state_dict, metadata) if return_metadata else state_dict

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict,
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs,
    ) -> None:
        """Add a LoRA adapter (diffusers' format; see the module docstring) to the transformer. Keys that do not fit
        the transformer raise a ValueError naming them, before anything is changed. Label-table rows saved with the
        adapter (a fine-tune onto new classes) grow the table and are written into it; `unload_lora_weights`
        restores the table."""
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            pretrained_model_name_or_path_or_dict = dict(pretrained_model_name_or_path_or_dict)
        state_dict, metadata = self.lora_state_dict(
            pretrained_model_name_or_path_or_dict, return_lora_metadata=True, **kwargs
        )
        prefix = f"{self.transformer_name}."
        foreign = [k for k in state_dict if not k.startswith(prefix)]
        if foreign:
            raise ValueError(
                f"LoRA keys must start with {prefix!r} (diffusers' format for this pipeline); got {foreign[:8]}"
                + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
            )
        lora, rows = split_class_rows({k.removeprefix(prefix): v for k, v in state_dict.items()})
        rank = (metadata or {}).get(f"{prefix}r") if not (metadata or {}).get(f"{prefix}rank_pattern") else None
        check_lora_state_dict(self.transformer, lora, rank)
        if rows:
            if getattr(self, "_base_class_table", None) is None:  # what unload_lora_weights restores
                self._base_class_table = class_table(self.transformer)[1].class_embedder.weight.detach().clone()
            load_class_rows(self.transformer, rows)
        if lora:
            self.transformer.load_lora_adapter(
                {prefix + k: v for k, v in lora.items()},
                prefix=self.transformer_name,
                adapter_name=adapter_name,
                metadata=metadata,
                _pipeline=self,
                hotswap=hotswap,
            )

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        transformer_lora_layers: dict[str, torch.Tensor] | nn.Module,
        transformer_lora_adapter_metadata: dict | None = None,
        is_main_process: bool = True,
        weight_name: str | None = None,
        save_function=None,
        safe_serialization: bool = True,
    ) -> None:
        """Write `pytorch_lora_weights.safetensors`: `transformer_lora_layers` (PEFT's
        `get_peft_model_state_dict(transformer)`, plus any `finetuning.class_rows_state_dict`) under the
        "transformer." prefix; `transformer_lora_adapter_metadata` is the adapter's `LoraConfig.to_dict()`."""
        if not transformer_lora_layers:
            raise ValueError("`transformer_lora_layers` is empty: there is nothing to save.")
        cls._save_lora_weights(
            save_directory=save_directory,
            lora_layers={cls.transformer_name: transformer_lora_layers},
            lora_metadata={cls.transformer_name: transformer_lora_adapter_metadata},
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=save_function,
            safe_serialization=safe_serialization,
        )

    def fuse_lora(self, components: list[str] = ["transformer"], lora_scale: float = 1.0, **kwargs) -> None:  # noqa: B006
        """Merge the active adapters into the transformer's weights (`lora_scale` times their update)."""
        super().fuse_lora(components=components, lora_scale=lora_scale, **kwargs)

    def unfuse_lora(self, components: list[str] = ["transformer"], **kwargs) -> None:  # noqa: B006
        """Take the fused adapters back out of the transformer's weights."""
        super().unfuse_lora(components=components, **kwargs)

    def unload_lora_weights(self) -> None:
        """Remove every adapter, and restore the label table if an adapter grew it."""
        super().unload_lora_weights()
        base = getattr(self, "_base_class_table", None)
        if base is not None:
            resize_class_embedding(self.transformer, len(base) - 1)
            with torch.no_grad():
                class_table(self.transformer)[1].class_embedder.weight.copy_(base)
            self._base_class_table = None
