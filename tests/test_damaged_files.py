"""Damaged files: a truncated safetensors file, a config entry of the wrong type, a missing component folder, a
pickle that holds more than tensors, a remote-code repo without einops. Each is an error naming the file (or the
package) and the fix, raised before anything is built: through `DiffiTPipeline.from_pretrained`, `diffit sample
--model` (one line, exit status 2), the models' `from_pretrained`, `DiffiTTransformer2DModel.from_single_file`, and
plain diffusers loading the generated code."""

import argparse
import json
import os
import re
import shutil

import pytest
import torch
from diffusers import ModelMixin
from safetensors.torch import save_file

from diffusers_diffit import (
    DiffiTPipeline,
    DiffiTTransformer2DModel,
    DiffiTUNet2DModel,
    EDMHeunScheduler,
    cli,
    embedded_model_path,
)
from diffusers_diffit.remote_code import generate_module_file
from tests.utils import DEPTH, load_script, named_model, official_layout_checkpoint, run_isolated_python


def truncate(folder):
    path = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return r"diffusion_pytorch_model\.safetensors is truncated: \d+ bytes, its header places tensors up to byte"


def cut_header(folder):
    path = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:5])
    return r"diffusion_pytorch_model\.safetensors is truncated or not a safetensors file \(5 bytes"


def wrong_type(folder):
    path = folder / "transformer" / "config.json"
    config = json.loads(path.read_text())
    config["num_classes"] = str(config["num_classes"])
    path.write_text(json.dumps(config))
    expects = rf"{config['_class_name']} expects type int"
    return rf"transformer/config\.json: 'num_classes' is '{config['num_classes']}' \(str\); {expects}"


def a_list(folder):
    path = folder / "transformer" / "config.json"
    config = json.loads(path.read_text())
    config["sample_size"] = [32]
    path.write_text(json.dumps(config))
    return rf"'sample_size' is \[32\] \(list\); {config['_class_name']} expects type int"


def no_scheduler(folder):
    shutil.rmtree(folder / "scheduler")
    return r"model_index\.json lists the component 'scheduler' .*the folder .*scheduler is missing"


DAMAGES = [truncate, cut_header, wrong_type, a_list, no_scheduler]
FIX = r"download the pipeline again \(snapshot_download\(\.\.\., force_download=True\)\) or save it again"


@pytest.fixture
def damaged(request, tmp_path):
    folder = tmp_path / "digits"
    shutil.copytree(embedded_model_path("digits"), folder)
    return folder, request.param(folder)


@pytest.mark.parametrize("damaged", DAMAGES, indirect=True, ids=[f.__name__ for f in DAMAGES])
def test_from_pretrained_names_the_damaged_file_and_the_fix(damaged, monkeypatch):
    folder, message = damaged
    built = []
    monkeypatch.setattr(DiffiTPipeline, "__init__", lambda self, *a, **k: built.append(self))
    with pytest.raises(ValueError, match=message) as error:
        DiffiTPipeline.from_pretrained(folder)
    assert str(folder) in str(error.value) and built == []  # nothing was built
    assert len(re.findall(FIX, str(error.value))) == 1


@pytest.mark.parametrize("damaged", [truncate], indirect=True)
def test_cli_reports_a_damaged_model_in_one_line(damaged, capsys):
    folder, message = damaged
    assert cli.main(["sample", "--model", str(folder), "--labels", "3", "--output", str(folder / "g.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffit sample: error: ") and err.count("\n") == 1
    assert re.search(message, err) and not (folder / "g.png").exists()


MODEL_FIX = r"download the model again \(force_download=True\) or save it again"
MODELS = [(DiffiTUNet2DModel, "digits"), (DiffiTTransformer2DModel, "digits-latent")]


@pytest.mark.parametrize("damage", [truncate, cut_header, wrong_type, a_list])
@pytest.mark.parametrize("model_class, name", MODELS, ids=[name for _, name in MODELS])
def test_model_from_pretrained_names_the_damaged_file_and_the_fix(model_class, name, damage, tmp_path, monkeypatch):
    folder = tmp_path / name
    shutil.copytree(os.path.join(embedded_model_path(name), "transformer"), folder / "transformer")
    message = damage(folder)
    loaded = []  # diffusers' loader is never entered: nothing is built
    monkeypatch.setattr(ModelMixin, "from_pretrained", classmethod(lambda cls, *a, **k: loaded.append(cls)))
    for where in [
        dict(pretrained_model_name_or_path=folder, subfolder="transformer"),
        dict(pretrained_model_name_or_path=folder / "transformer"),
    ]:
        with pytest.raises(ValueError, match=message) as error:
            model_class.from_pretrained(**where)
        assert str(folder / "transformer") in str(error.value) and len(re.findall(MODEL_FIX, str(error.value))) == 1
    assert loaded == []


@pytest.mark.parametrize("model_class, name", MODELS, ids=[name for _, name in MODELS])
def test_generated_model_code_checks_folders_too(model_class, name, tmp_path):
    """The remote-code file of each model inlines the same rules, for users of plain diffusers."""
    folder = tmp_path / name
    shutil.copytree(os.path.join(embedded_model_path(name), "transformer"), folder / "transformer")
    message = truncate(folder)
    path = tmp_path / (model_class.__module__.rpartition(".")[2] + ".py")
    path.write_text(generate_module_file(model_class.__module__))
    generated = getattr(load_script(path, f"generated_{path.stem}"), model_class.__name__)
    assert generated is not model_class and not generated.__module__.startswith("diffusers_diffit")
    with pytest.raises(ValueError, match=message) as error:
        generated.from_pretrained(folder, subfolder="transformer")
    assert len(re.findall(MODEL_FIX, str(error.value))) == 1


def test_from_single_file_names_a_truncated_file_and_the_fix(tmp_path):
    path = tmp_path / "diffit.safetensors"
    save_file(official_layout_checkpoint(), path)
    path.write_bytes(path.read_bytes()[:-100])
    fix = r"download it again \(hf_hub_download\(\.\.\., force_download=True\)\) or write it again\.$"
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} is truncated: \d+ bytes, .*{fix}"):
        DiffiTTransformer2DModel.from_single_file(path)


@pytest.mark.parametrize("keep", [0.5, 0.0], ids=["cut", "empty"])
def test_truncated_pickle_checkpoint_names_the_file_and_the_fix(keep, tmp_path):
    path = tmp_path / "diffit.pt"
    torch.save(official_layout_checkpoint(), path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    fix = r"download it again \(hf_hub_download\(\.\.\., force_download=True\)\) or write it again\.$"
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} is truncated or not a PyTorch checkpoint .*{fix}"):
        DiffiTTransformer2DModel.from_single_file(path)


class RunsCode:
    """Unpickling it makes a folder: what a malicious checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("extra", ["namespace", "code"])
def test_pickle_holding_more_than_tensors_is_refused_with_the_fix(extra, tmp_path):
    marker = tmp_path / "unpickled"
    obj, name = {
        "namespace": (argparse.Namespace(lr=1e-4), "argparse.Namespace"),
        "code": (RunsCode(marker), "posix.mkdir"),
    }[extra]
    state = official_layout_checkpoint()
    path = tmp_path / "diffit.pt"
    torch.save({"ema": state, "args": obj}, path)
    with pytest.raises(ValueError) as error:
        DiffiTTransformer2DModel.from_single_file(path)
    assert str(error.value) == (
        f"Refused to load {path}: it holds {name} besides tensors, and unpickling that could run code. Convert it to "
        "safetensors, or, if you trust the file, load it yourself (torch.load(path, weights_only=False)) and pass the "
        "result instead of the path."
    )
    assert not marker.exists()
    if extra == "namespace":  # the fix: a trusted file, loaded by its owner
        model = DiffiTTransformer2DModel.from_single_file(torch.load(path, weights_only=False))
        assert model.config.num_layers == DEPTH


def test_plain_tensor_pickle_checkpoint_loads(tmp_path):
    state = official_layout_checkpoint()
    torch.save({"ema": state, "step": 7, "opt": {"lr": 1e-4}}, tmp_path / "diffit.pt")
    from_pickle = DiffiTTransformer2DModel.from_single_file(tmp_path / "diffit.pt").state_dict()
    from_dict = DiffiTTransformer2DModel.from_single_file(state).state_dict()
    assert from_pickle.keys() == from_dict.keys()
    assert all(torch.equal(from_pickle[k], from_dict[k]) for k in from_dict)


def test_remote_code_without_einops_says_how_to_install_it(tmp_path):
    """Plain diffusers (diffusers_diffit hidden) in a process where einops cannot be imported: the generated model
    file raises an ImportError naming einops and the pip line, through DiffusionPipeline and AutoModel."""
    torch.manual_seed(0)
    unet = named_model("tiny-unet", sample_size=8, block_out_channels=(16, 32))
    DiffiTPipeline(unet, EDMHeunScheduler()).save_pretrained(tmp_path / "repo", remote_code=True)
    child = (
        "import sys\n"
        "sys.modules['diffusers_diffit'] = sys.modules['einops'] = None  # hidden, as if not installed\n"
        "from diffusers import AutoModel, DiffusionPipeline\n"
        "for load in (DiffusionPipeline.from_pretrained, AutoModel.from_pretrained):\n"
        "    kwargs = {} if load is DiffusionPipeline.from_pretrained else {'subfolder': 'transformer'}\n"
        "    try:\n"
        "        load(sys.argv[1], trust_remote_code=True, **kwargs)\n"
        "    except ImportError as error:\n"
        "        print(type(error).__name__, error)\n"
    )
    stdout = run_isolated_python("-c", child, str(tmp_path / "repo"), cwd=tmp_path)
    message = "ImportError unet_diffit.py needs einops, which diffusers does not install: pip install einops"
    assert stdout.splitlines() == [message, message]
