"""The Gradio Space's sampling function, on the digits model shipped in the package (gradio itself is optional)."""

import importlib.util
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[1] / "space_app" / "app.py"


@pytest.fixture(scope="module")
def app():
    spec = importlib.util.spec_from_file_location("space_app_main", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pipe(app):
    return app.load_pipeline()


def test_generate_makes_one_row_per_label(app, pipe):
    grid = app.generate(pipe, "3, 7", images_per_label=2, steps=4, guidance_scale=1.0, seed=0)
    side = pipe.transformer.config.sample_size
    upscale = max(1, 512 // (side * 2))
    assert grid.size == (2 * side * upscale + 2, 2 * side * upscale + 2)


def test_generate_rejects_bad_requests(app, pipe):
    with pytest.raises(ValueError, match="At most"):
        app.generate(pipe, "1, 2, 3", images_per_label=30, steps=2, guidance_scale=1.0, seed=0)
    with pytest.raises(ValueError):
        app.generate(pipe, "not-a-digit-class", images_per_label=1, steps=2, guidance_scale=1.0, seed=0)


def test_demo_builds_when_gradio_is_installed(app, pipe):
    pytest.importorskip("gradio")
    assert app.build_demo(pipe) is not None
