"""NVIDIA's released DiffiT checkpoints -> `DiffiTTransformer2DModel` (official key layout:
docs/diffit-equations.md#latent).

Everything is checked before anything is assigned: missing, unexpected and mis-shaped tensors are reported together
in one `ValueError`, so a model is never half-loaded.
"""

import importlib
import logging
import math
import os
import pickle
import re
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from safetensors.torch import load_file

from .file_checks import check_component_folder, check_safetensors_file, read_json_object
from .models.embeddings import get_relative_position_index
from .utils import resolve_dtype


logger = logging.getLogger(__name__)

WRAPPER_KEYS = ("ema", "state_dict", "model", "module")  # checked in this order: EMA weights win
WRAPPER_PREFIXES = ("module.", "ema.", "model.")

# official name -> diffusers name, for everything outside the per-block attention projections
_RENAMES = [
    (r"^x_embedder\.proj\.", "patch_embed."),
    (r"^t_embedder\.mlp\.0\.", "condition_embed.timestep_embedder.linear_1."),
    (r"^t_embedder\.mlp\.2\.", "condition_embed.timestep_embedder.linear_2."),
    (r"^y_embedder\.embedding_table\.", "condition_embed.class_embedder."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"transformer_blocks.\1.attn.to_out."),
    (
        r"^blocks\.(\d+)\.attn\.relative_position_bias_table$",
        r"transformer_blocks.\1.attn.relative_position_bias_table",
    ),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"transformer_blocks.\1.ff.net.0.proj."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"transformer_blocks.\1.ff.net.2."),
    (r"^final_layer\.linear\.", "proj_out."),
]
_QKV = re.compile(r"^blocks\.(\d+)\.attn\.(qkv|qkv_temb)\.(weight|bias)$")


# what to do about a damaged checkpoint file
REWRITE_FIX = "download it again (hf_hub_download(..., force_download=True)) or write it again"


def read_checkpoint(checkpoint: str | os.PathLike | dict) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint, common training wrappers stripped: `checkpoint` is a state dict already, a
    local file (`.safetensors`, checked whole first; `.pt/.pth/.bin/.ckpt` through `read_pickle`), or
    `owner/repo/filename` downloaded from the Hub. A damaged file is a `ValueError` naming it and the fix."""
    if isinstance(checkpoint, dict):
        return unwrap_state_dict(checkpoint)
    path = Path(checkpoint)
    if not path.is_file():
        parts = str(path).split("/")
        if len(parts) < 3 or str(path).startswith((".", "/")):
            raise FileNotFoundError(
                f"No checkpoint file at {str(path)!r} (give a local file or 'owner/repo/filename')."
            )
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:])))
    if path.suffix == ".safetensors":
        check_safetensors_file(path, REWRITE_FIX)
        state_dict = load_file(path)
    elif path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        state_dict = read_pickle(path)
    else:
        raise ValueError(f"Unsupported checkpoint format {path.suffix!r}: use .safetensors, .pt, .pth, .bin or .ckpt.")
    return unwrap_state_dict(state_dict)


def read_pickle(path: Path) -> dict:
    """`torch.load(path, weights_only=True)`: tensors and plain containers only. A pickle that holds anything else
    (a custom class, an `argparse.Namespace` of training arguments...) is refused with a `ValueError`, since
    unpickling it could run code; a truncated or empty file is a `ValueError` naming it too."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as error:  # what torch's zip reader and unpickler raise on a cut file
        reason = str(error).split(". ")[0] or type(error).__name__
        raise ValueError(f"{path} is truncated or not a PyTorch checkpoint ({reason}): {REWRITE_FIX}.") from None
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))  # torch names the first object it refused
        holds = found.group(1) if found else "objects"
        raise ValueError(
            f"Refused to load {path}: it holds {holds} besides tensors, and unpickling that could run code. Convert "
            "it to safetensors, or, if you trust the file, load it yourself (torch.load(path, weights_only=False)) "
            "and pass the result instead of the path."
        ) from None


def unwrap_state_dict(state_dict: dict) -> dict[str, torch.Tensor]:
    """Peel `{"ema": ...}` / `{"state_dict": ...}` containers and `module.` / `ema.` / `model.` key prefixes."""
    for key in WRAPPER_KEYS:
        if isinstance(state_dict.get(key), dict):
            logger.info("Using the %r entry of the checkpoint.", key)
            return unwrap_state_dict(state_dict[key])
    state_dict = {k: v for k, v in state_dict.items() if torch.is_tensor(v)}
    for prefix in WRAPPER_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            return unwrap_state_dict({k[len(prefix) :]: v for k, v in state_dict.items()})
    return state_dict


def infer_config(state_dict: dict[str, torch.Tensor]) -> dict:
    """Read the whole `DiffiTTransformer2DModel` config off the tensor shapes of an official checkpoint."""
    if any("adaLN_modulation" in k for k in state_dict):
        raise ValueError(
            "This is a DiT checkpoint (it has adaLN_modulation layers), not DiffiT: load it with diffusers' "
            "DiTTransformer2DModel / DiTPipeline instead."
        )
    required = [
        "x_embedder.proj.weight",
        "t_embedder.mlp.0.weight",
        "final_layer.linear.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.relative_position_bias_table",
        "blocks.0.mlp.fc1.weight",
    ]
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise ValueError(
            f"Not an official DiffiT checkpoint: missing {missing} (found e.g. {sorted(state_dict)[:5]})."
        )

    dim, in_channels, patch_size, _ = state_dict["x_embedder.proj.weight"].shape
    table_rows, heads = state_dict["blocks.0.attn.relative_position_bias_table"].shape
    window = (math.isqrt(table_rows) + 1) // 2
    if (2 * window - 1) ** 2 != table_rows:
        raise ValueError(f"relative_position_bias_table has {table_rows} rows, which is not (2w-1)² for any window w.")
    num_layers = len({int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")})
    labels = state_dict.get("y_embedder.embedding_table.weight")
    return dict(
        sample_size=window * patch_size,
        patch_size=patch_size,
        in_channels=in_channels,
        out_channels=state_dict["final_layer.linear.weight"].shape[0] // patch_size**2,
        num_layers=num_layers,
        num_attention_heads=heads,
        attention_head_dim=dim // heads,
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / dim,
        num_classes=0 if labels is None else labels.shape[0] - 1,
        class_dropout_prob=0.0 if labels is None else 0.1,
        frequency_embedding_size=state_dict["t_embedder.mlp.0.weight"].shape[1],
    )


def convert_state_dict(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Rename official keys, split the stacked q/k/v projections, and verify (then drop) the derived tensors
    `pos_embed` and `relative_position_index` against what the model derives itself."""
    grid = config["sample_size"] // config["patch_size"]
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    derived = {"relative_position_index": get_relative_position_index(grid)}
    converted, problems = {}, []
    for key, tensor in state_dict.items():
        if key == "pos_embed":
            expected = get_2d_sincos_pos_embed(dim, grid, base_size=grid).float()[None]  # as the model builds it
            rounded = expected.to(tensor.dtype).float()  # as a half-precision checkpoint holds it
            if tensor.shape != expected.shape or not torch.allclose(tensor.cpu().float(), rounded, atol=1e-4):
                problems.append(
                    f"pos_embed {tuple(tensor.shape)} is not the fixed sin-cos table of a {grid}x{grid} grid"
                )
            continue
        if key.endswith("attn.relative_position_index"):
            if not torch.equal(tensor.long().cpu(), derived["relative_position_index"]):
                problems.append(f"{key} differs from the Swin index of a {grid}x{grid} window")
            continue
        match = _QKV.match(key)
        if match:
            block, kind, param = match.groups()
            suffix = "_time" if kind == "qkv_temb" else ""
            if tensor.shape[0] % 3:
                problems.append(f"{key} {tuple(tensor.shape)}: first dim is not 3 stacked projections")
                continue
            for name, part in zip("qkv", tensor.chunk(3, dim=0)):
                converted[f"transformer_blocks.{block}.attn.to_{name}{suffix}.{param}"] = part
            continue
        for pattern, replacement in _RENAMES:
            new_key, hits = re.subn(pattern, replacement, key)
            if hits:
                converted[new_key] = tensor
                break
        else:
            converted[f"<unexpected> {key}"] = tensor
    if problems:
        raise ValueError("The checkpoint's derived tensors do not match this model:\n  " + "\n  ".join(problems))
    return converted


def load_official_transformer(model_cls, checkpoint: str | os.PathLike | dict, **config_overrides):
    """Build `model_cls` from an official checkpoint (a file or its state dict, `read_checkpoint`); strict: one error
    lists every key that does not fit."""
    dtype = resolve_dtype(config_overrides.pop("dtype", None), config_overrides.pop("torch_dtype", None))
    dtype = dtype or torch.float32
    official = read_checkpoint(checkpoint)
    config = {**infer_config(official), **config_overrides}
    state_dict = convert_state_dict(official, config)

    with init_empty_weights():
        model = model_cls(**config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(k.removeprefix("<unexpected> ") for k in set(state_dict) - set(expected))
    mis_shaped = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}"
        for k in set(expected) & set(state_dict)
        if state_dict[k].shape != expected[k]
    )
    if missing or unexpected or mis_shaped:
        report = [("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)]
        source = "the state dict" if isinstance(checkpoint, dict) else repr(os.fspath(checkpoint))
        raise ValueError(
            f"Cannot load {source} into {model_cls.__name__}({config}):\n"
            + "\n".join(f"  {name} ({len(keys)}): {keys}" for name, keys in report if keys)
        )
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}, assign=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------------
# Pipeline folders, checked before diffusers loads them: a damaged file is named with its fix, nothing is built


def check_pipeline_folder(folder: str | os.PathLike) -> None:
    """Raise `ValueError` naming the file and the fix when a pipeline folder is damaged: model_index.json missing or
    not JSON, a component folder listed in model_index.json missing, or a component folder that fails
    `check_component_folder` (a config not JSON, a config entry of the wrong type for its class such as
    `"num_layers": "28"`, a truncated safetensors file). Reads only JSON and the safetensors headers."""
    folder = Path(folder)
    fix = "download the pipeline again (snapshot_download(..., force_download=True)) or save it again"
    index = read_json_object(folder / "model_index.json", fix)
    for name, entry in index.items():
        is_component = isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)
        if name.startswith("_") or not is_component:  # a config value, or an optional component left out
            continue
        component = folder / name
        if not component.is_dir():
            raise ValueError(
                f"{folder / 'model_index.json'} lists the component {name!r} ({entry[1]}), but the folder {component} "
                f"is missing: {fix}."
            )
        check_component_folder(component, _component_class(entry), fix)


def _component_class(entry: list) -> type | None:
    """The class a model_index.json entry [library, class] names, from this package or from the library."""
    for module_name in (__name__.rpartition(".")[0], entry[0]):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, entry[1]):
            return getattr(module, entry[1])
    return None
