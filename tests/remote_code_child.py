"""Run by tests/test_remote_code.py in a separate `python -I` process where `diffusers_diffit` cannot be imported:
load a remote-code DiffiT folder with plain diffusers, sample, run the model loaded with AutoModel, and save the
results for the parent to compare with the package's.

    python -I tests/remote_code_child.py FOLDER OUT.safetensors '{"class_labels": [...], "num_inference_steps": 3}'
"""

import importlib.abc
import importlib.util
import json
import sys


class NoDiffiTPackage(importlib.abc.MetaPathFinder):
    """Hides diffusers-diffit (installed in the test environment) from this process."""

    def find_spec(self, name, path=None, target=None):
        if name == "diffusers_diffit" or name.startswith("diffusers_diffit."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden from this process)")
        return None


sys.meta_path.insert(0, NoDiffiTPackage())

import torch  # noqa: E402
from diffusers import AutoModel, DiffusionPipeline  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def main(folder: str, out: str, call_kwargs: str) -> None:
    try:
        importlib.util.find_spec("diffusers_diffit")
        raise AssertionError("diffusers_diffit is importable in the child process")
    except ModuleNotFoundError:
        pass
    torch.set_num_threads(1)
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    images = pipe(**json.loads(call_kwargs), generator=torch.Generator().manual_seed(0), output_type="pt").images

    model = AutoModel.from_pretrained(folder, subfolder="transformer", trust_remote_code=True)
    cfg = model.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, cfg.num_classes]) if cfg.num_classes else None
    with torch.no_grad():
        forward = model(x, torch.tensor([3.0, 0.5]), class_labels=labels, return_dict=False)[0]

    single_file_error = None
    if hasattr(type(model), "from_single_file"):  # NVIDIA's checkpoint format: a feature of the package only
        try:
            type(model).from_single_file("missing.safetensors")
            raise AssertionError("from_single_file ran without the package")
        except ImportError as error:
            single_file_error = str(error)

    report = {
        "pipeline": f"{type(pipe).__module__}.{type(pipe).__name__}",
        "components": {k: type(v).__module__ for k, v in pipe.components.items() if v is not None},
        "automodel": f"{type(model).__module__}.{type(model).__name__}",
        "diffusers_diffit_modules": sorted(m for m in sys.modules if m.startswith("diffusers_diffit")),
        "from_single_file": single_file_error,
    }
    tensors = {"images": images.contiguous(), "forward": forward.contiguous()}
    save_file(tensors, out, metadata={"report": json.dumps(report)})


if __name__ == "__main__":
    main(*sys.argv[1:])
