"""Saved files checked before anything is built from them: a damaged file is a `ValueError` naming it and the fix.

Only JSON and safetensors headers are read. The rules live here once: `DiffiTModelMixin.from_pretrained` checks a
model folder with them, `diffusers_diffit.loading.check_pipeline_folder` every component folder of a pipeline, and
`from_single_file` the safetensors file it is given. Standard library only, so that the remote-code model files
(`diffusers_diffit.remote_code`) carry the same checks.
"""

import inspect
import json
import os
from pathlib import Path


def read_json_object(path: str | os.PathLike, fix: str) -> dict:
    """The JSON object in `path`; a missing file, invalid JSON or another JSON value is a `ValueError` ending in
    `fix`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is missing: {fix}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): {fix}.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}: {fix}.")
    return data


def check_component_folder(folder: str | os.PathLike, cls: type | None, fix: str) -> None:
    """A saved model or scheduler folder: its config.json / scheduler_config.json must be a JSON object whose entries
    have the JSON type of `cls`'s defaults (`check_config_types`; any type when `cls` is None), and every safetensors
    file in it must be whole (`check_safetensors_file`). A config file that is absent is left to the loader."""
    folder = Path(folder)
    for path in (folder / "config.json", folder / "scheduler_config.json"):
        if path.is_file():
            check_config_types(path, cls, fix)
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors_file(path, fix)


def check_config_types(path: str | os.PathLike, cls: type | None, fix: str) -> None:
    """Each entry of the config file `path` against the JSON type of its `cls.__init__` default (int, float, str,
    bool, list): e.g. `"num_layers": "28"` is a `ValueError` naming the file, the entry and the type expected."""
    config = read_json_object(path, fix)
    if cls is None:
        return
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
    for key, value in config.items():
        default = defaults.get(key, inspect.Parameter.empty)
        if key.startswith("_") or default in (inspect.Parameter.empty, None) or value is None:
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        elif isinstance(default, (list, tuple)):
            ok = isinstance(value, list)
        else:
            continue
        if not ok:
            raise ValueError(
                f"{path}: {key!r} is {value!r} ({type(value).__name__}); {cls.__name__} expects type "
                f"{'list' if isinstance(default, (list, tuple)) else type(default).__name__} (like {default!r}). "
                f"Correct it in the file, or {fix}."
            )


def check_safetensors_file(path: str | os.PathLike, fix: str) -> None:
    """A safetensors file holds an 8-byte header length, the JSON header, then the tensor bytes the header places: a
    file shorter than that, or whose header is not a safetensors JSON header, is a `ValueError` ending in `fix`."""
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        head = file.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else None
        if length is None or 8 + length > size:
            raise ValueError(f"{path} is truncated or not a safetensors file ({size} bytes, no whole header): {fix}.")
        try:
            header = json.loads(file.read(length))
            tensors = [entry for key, entry in header.items() if key != "__metadata__"]
            end = max((int(entry["data_offsets"][1]) for entry in tensors), default=0)
        except (ValueError, AttributeError, KeyError, IndexError, TypeError):  # JSONDecodeError is a ValueError
            raise ValueError(f"{path} has a damaged safetensors header: {fix}.") from None
    if 8 + length + end > size:
        raise ValueError(
            f"{path} is truncated: {size} bytes, its header places tensors up to byte {8 + length + end}: {fix}."
        )
