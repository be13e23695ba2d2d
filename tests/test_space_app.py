"""The Gradio Space's logic (space_app/app.py) on the digits model shipped in the package: checking requests,
classes, schedulers, sampling, the model's licence. The page itself is driven in a browser in test_space_ui.py."""

import importlib.util
import io
import json
import random
import shutil
import types
from pathlib import Path

import pytest

from diffusers_diffit import embedded_model_path, imagenet_id2label
from diffusers_diffit.labels import lookup_label_ids


APP = Path(__file__).resolve().parents[1] / "space_app" / "app.py"


def load_module(path: Path, name: str):
    """A script of space_app/ as a module (space_app/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_app():
    return load_module(APP, "space_app_main")


@pytest.fixture(scope="module")
def app():
    return load_app()


@pytest.fixture(scope="module")
def loaded(app):
    return app.load_pipeline()


@pytest.fixture(scope="module")
def pipe(loaded):
    return loaded[0]


def request(**changes):
    values = dict(
        classes=["3", "7"],
        images_per_class=2,
        steps=4,
        guidance_scale=1.25,
        guidance_schedule="constant",
        scheduler="default",
        seed=0,
        randomize_seed=False,
    )
    values.update(changes)
    return values


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class ImageNetLike:
    """The label side of a 1000-class pipeline (id2label and get_label_ids) without its weights."""

    def __init__(self):
        self.id2label = imagenet_id2label()

    def get_label_ids(self, label):
        return lookup_label_ids(label, self.id2label)


def test_digits_model_is_described_with_the_package_licence(app, pipe, loaded):
    info = loaded[1]
    assert info.license == "apache-2.0" and info.hub_id is None
    text = app.describe_model(pipe, info)
    assert "digits" in text and "apache-2.0" in text and "](https://" in text


def test_licence_comes_from_the_card_then_from_the_kind_of_model(app, tmp_path):
    assert app.model_license(tmp_path, num_classes=1000, embedded=False) == "cc-by-nc-sa-4.0"
    assert app.model_license(tmp_path, num_classes=10, embedded=True) == "apache-2.0"
    assert app.model_license(tmp_path, num_classes=10, embedded=False) == "unknown"
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# a card\n")
    assert app.model_license(tmp_path, num_classes=1000, embedded=False) == "mit"


def test_model_comes_from_the_environment_then_the_space_config(app, monkeypatch, tmp_path):
    monkeypatch.setattr(app, "SPACE_CONFIG", tmp_path / "space_config.json")
    monkeypatch.delenv("DIFFIT_MODEL", raising=False)
    assert app.configured_model() is None
    (tmp_path / "space_config.json").write_text(json.dumps({"model": "someone/DiffiT-XL-2-256"}))
    assert app.configured_model() == "someone/DiffiT-XL-2-256"
    monkeypatch.setenv("DIFFIT_MODEL", "other/model")
    assert app.configured_model() == "other/model"


def test_local_model_folder_is_served_with_its_card_licence(app, tmp_path):
    folder = tmp_path / "my-digits"
    shutil.copytree(embedded_model_path("digits"), folder)
    (folder / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n# my digits\n")
    pipe, info = app.load_pipeline(str(folder))
    assert info.license == "cc-by-4.0" and info.name == "my-digits" and info.card_url is None
    assert app.class_choices(pipe) == [str(i) for i in range(10)]


def test_class_picker_lists_every_imagenet_class_once_and_resolves_them(app):
    pipe = ImageNetLike()
    choices = app.class_choices(pipe)
    assert len(choices) == len(set(choices)) == 1000
    assert "golden retriever" in choices and "crane (134)" in choices and "crane (517)" in choices
    assert app.resolve_classes(pipe, choices) == list(range(1000))
    assert app.resolve_classes(pipe, ["Golden Retriever", "Tinca tinca", "88"]) == [207, 0, 88]
    with pytest.raises(ValueError, match=r"Unknown class label 'golden retreiver'.*Closest.*'golden retriever'"):
        app.resolve_classes(pipe, ["golden retreiver"])
    with pytest.raises(ValueError, match="several classes"):
        app.resolve_classes(pipe, ["crane"])


def test_unknown_digit_class_lists_the_model_classes(app, pipe):
    with pytest.raises(
        ValueError, match=r"Unknown class label 'seven'\. No close match\. This model's classes are 0, 1, 2"
    ):
        app.resolve_classes(pipe, ["seven"])
    assert app.resolve_classes(pipe, []) == [] and app.resolve_classes(pipe, None) == []


def test_random_classes_are_distinct_choices(app):
    choices = [str(i) for i in range(10)]
    picked = app.random_classes(choices, 3, random.Random(0))
    assert len(set(picked)) == 3 and set(picked) <= set(choices)
    assert len(app.random_classes(choices[:2], 5, random.Random(0))) == 2


@pytest.mark.parametrize(
    "seed, message",
    [
        (None, "The seed is empty"),
        ("", "The seed is empty"),
        (10**20, "too large"),
        (-1, "too small"),
        (float("nan"), "whole number"),
        (2.5, "whole number"),
        ("12a", "whole number"),
        (True, "whole number"),
    ],
)
def test_bad_seeds_are_explained(app, seed, message):
    with pytest.raises(ValueError, match=message):
        app.check_seed(seed, randomize=False)


def test_seed_is_kept_or_randomized(app):
    assert app.check_seed(42, randomize=False) == 42 and app.check_seed(7.0, randomize=False) == 7
    assert app.check_seed(app.MAX_SEED, randomize=False) == app.MAX_SEED
    seed = app.check_seed(None, randomize=True, rng=random.Random(1))
    assert 0 <= seed <= app.MAX_SEED


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(classes=[str(i) for i in range(9)]), r"That is 18 images \(9 classes × 2 per class\)"),
        (dict(images_per_class=0), "Images per class must be from 1 to 8"),
        (dict(images_per_class=2.5), "Images per class must be a whole number"),
        (dict(steps=10_000), "Steps must be from 1 to 250"),
        (dict(guidance_scale=float("nan")), "Guidance scale must be a number"),
        (dict(guidance_scale=50), "Guidance scale must be from 1.0 to 10.0"),
        (dict(scheduler="ddpm"), "Scheduler must be one of default, edm-"),
        (dict(guidance_schedule="power-cosine"), "power-cosine guidance schedule needs a discrete-time scheduler"),
        (dict(classes=["x"]), "Unknown class label 'x'"),
        (dict(seed=None), "The seed is empty"),
    ],
)
def test_bad_requests_are_explained(app, pipe, changes, message):
    with pytest.raises(ValueError, match=message):
        app.check_request(pipe, **request(**changes))


def test_choices_offer_the_models_own_scheduler_first_and_only_valid_ones(app, pipe):
    values = [value for _, value in app.scheduler_choices(pipe)]
    assert values[0] == "default" and type(pipe.scheduler).__name__ in app.scheduler_choices(pipe)[0][0]
    assert values[1:] and all(value.startswith("edm-") for value in values[1:])  # digits: an EDM model
    assert app.guidance_schedules(pipe) == ["constant"]
    defaults = app.recipe_defaults(pipe)
    assert defaults.steps == pipe.config.num_inference_steps
    assert defaults.guidance_scale == pipe.config.guidance_scale


def test_generate_gives_captioned_images_a_grid_and_per_step_progress(app, pipe):
    steps = []
    result = app.generate(pipe, **request(), on_step=lambda done, total: steps.append((done, total)))
    side = pipe.transformer.config.sample_size
    assert [image.size for image in result.images] == [(side, side)] * 4
    assert result.captions == ["3", "3", "7", "7"] and result.seed == 0
    upscale = 512 // (side * 2)
    assert result.grid.size == (2 * side * upscale + 2, 2 * side * upscale + 2)
    total = steps[0][1]
    assert total >= 4 and steps == [(i, total) for i in range(1, total + 1)]


def test_same_seed_same_png_bytes_and_the_loaded_scheduler_is_kept(app, pipe):
    loaded = pipe.scheduler
    first = app.generate(pipe, **request(seed=123, scheduler="edm-euler"))
    assert pipe.scheduler is loaded
    again = app.generate(pipe, **request(seed=123, scheduler="edm-euler"))
    other = app.generate(pipe, **request(seed=124, scheduler="edm-euler"))
    assert [png_bytes(i) for i in first.images] == [png_bytes(i) for i in again.images]
    assert [png_bytes(i) for i in first.images] != [png_bytes(i) for i in other.images]


def test_unconditional_request(app, pipe):
    result = app.generate(pipe, **request(classes=[], images_per_class=3))
    assert len(result.images) == 3 and result.captions == ["unconditional"] * 3


def test_examples_are_valid_requests(app, pipe):
    rows = app.example_rows(pipe)
    assert len(rows) >= 3
    for row in rows:
        app.check_request(pipe, **dict(zip(app.INPUT_NAMES, row)))


def test_spaces_gpu_is_applied_only_when_spaces_is_importable(app, monkeypatch):
    def fn():
        return "sampled"

    monkeypatch.setattr(app, "spaces", None)
    assert app.on_gpu(fn) is fn
    calls = []

    def gpu(duration):
        calls.append(duration)
        return lambda f: types.SimpleNamespace(wrapped=f)

    monkeypatch.setattr(app, "spaces", types.SimpleNamespace(GPU=gpu))
    assert app.on_gpu(fn).wrapped is fn and calls == [120]


def test_demo_has_a_generate_endpoint(app, loaded):
    demo = app.build_demo(*loaded)
    api_names = [fn.api_name for fn in demo.fns.values()]
    assert "generate" in api_names
