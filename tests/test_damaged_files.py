"""Damaged pipeline folders: a truncated safetensors file, a config entry of the wrong type, a missing component
folder. Each is a `ValueError` naming the file and the fix, raised before anything is built, through
`DiffiTPipeline.from_pretrained` and `diffit sample --model` (one line, exit status 2)."""

import json
import re
import shutil

import pytest

from diffusers_diffit import DiffiTPipeline, cli, embedded_model_path


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
    config["layers_per_block"] = "2"
    path.write_text(json.dumps(config))
    return r"transformer/config\.json: 'layers_per_block' is '2' \(str\); DiffiTUNet2DModel expects type int"


def a_list(folder):
    path = folder / "transformer" / "config.json"
    config = json.loads(path.read_text())
    config["sample_size"] = [32]
    path.write_text(json.dumps(config))
    return r"'sample_size' is \[32\] \(list\); DiffiTUNet2DModel expects type int"


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
