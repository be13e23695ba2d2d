"""The Gradio Space's logic (space_app/app.py) on the two models shipped in the package ("digits", the default, and
"digits-latent"): which models it serves, checking requests, classes, schedulers, sampling, the models' licence, and
what the page's Model picker switches. The page itself is driven in a browser in test_space_ui.py."""

import dataclasses
import io
import json
import random
import shutil
import types

import pytest

from diffusers_diffit import embedded_model_path, imagenet_id2label
from diffusers_diffit.guidance import usable_guidance_schedules
from diffusers_diffit.labels import lookup_label_ids
from diffusers_diffit.schedulers import scheduler_presets
from tests.utils import load_app, shipped_models


@pytest.fixture(scope="module")
def app():
    return load_app()


@pytest.fixture(scope="module")
def models(app):
    return shipped_models(app)


@pytest.fixture(scope="module")
def loaded(models):
    return models["digits"]


@pytest.fixture(scope="module")
def pipe(loaded):
    return loaded[0]


@pytest.fixture(scope="module")
def latent(models):
    return models["digits-latent"][0]


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
    assert app.model_license(tmp_path, num_classes=10, embedded=True) == "apache-2.0"  # shipped: the package's


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


@pytest.mark.parametrize("name", ["digits", "digits-latent"])
def test_examples_are_valid_requests_shown_with_their_models_labels(app, models, name):
    pipe = models[name][0]
    rows = app.example_rows(pipe)
    assert len(rows) >= 3
    for values in rows:
        app.check_request(pipe, **dataclasses.asdict(values))
        cells = app.example_cells(pipe, name, values)
        assert cells[0] == name and cells[6] == app.scheduler_label(pipe, values.scheduler)


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


# ---------------------------------------------------------------------------------------------------------------------
# The two shipped models and the Model picker


def latent_request(**changes):
    """A cheap request for the latent stand-in model: two steps, whatever its saved recipe."""
    return request(**dict(dict(steps=2), **changes))


def test_both_shipped_models_are_served_digits_first_and_picked_by_name(app, models):
    assert list(models) == ["digits", "digits-latent"]
    for name, (pipe, info) in models.items():
        assert info.name == name and info.embedded and info.license == "apache-2.0" and info.hub_id is None
        assert app.pick_model(models, name)[0] is pipe  # the loaded pipeline, not a new one
    with pytest.raises(ValueError, match="Model must be one of digits, digits-latent; got 'digits-xl'"):
        app.pick_model(models, "digits-xl")


def test_one_configured_model_is_served_alone(app, monkeypatch, tmp_path):
    folder = tmp_path / "my-digits"
    shutil.copytree(embedded_model_path("digits"), folder)
    monkeypatch.setattr(app, "SPACE_CONFIG", tmp_path / "space_config.json")
    monkeypatch.setenv("DIFFIT_MODEL", str(folder))
    assert list(app.load_pipelines()) == ["my-digits"]
    monkeypatch.setenv("DIFFIT_MODEL", "digits-latent")  # a shipped model, by its name
    served = app.load_pipelines()
    ((pipe, info),) = served.values()
    assert info.name == "digits-latent" and info.embedded and pipe.vae is not None
    (picker,) = [block for block in app.build_demo(served).blocks.values() if block.elem_id == "model"]
    assert [value for _, value in picker.choices] == ["digits-latent"] and not picker.interactive

    # a Space built for the shipped models: both, with the licence it was built with
    monkeypatch.delenv("DIFFIT_MODEL")
    (tmp_path / "space_config.json").write_text(json.dumps({"model": None, "license": "mit"}))
    served = app.load_pipelines()
    assert list(served) == ["digits", "digits-latent"] and {info.license for _, info in served.values()} == {"mit"}


def test_latent_model_line_counts_its_transformer_and_vae(app, models):
    pipe, info = models["digits-latent"]
    params = sum(p.numel() for p in pipe.transformer.parameters()) / 1e6
    vae_params = sum(p.numel() for p in pipe.vae.parameters()) / 1e6
    text = app.describe_model(pipe, info)
    assert (
        f"a {params:.2f} M-parameter latent DiffiT transformer with a {vae_params:.2f} M-parameter VAE, trained on "
        "scikit-learn's 8×8 digits (32×32 px)"
    ) in text
    assert "`digits-latent`" in text and "apache-2.0" in text and "](https://" in text


def test_latent_model_offers_its_discrete_time_schedulers(app, latent):
    values = [value for _, value in app.scheduler_choices(latent)]
    assert values == ["default", *scheduler_presets(latent.denoiser_type)]
    assert not any(value.startswith("edm-") for value in values)  # a DDPM-family model
    schedules = app.guidance_schedules(latent)
    assert schedules[0] == latent.config.guidance_schedule
    assert set(schedules) == set(usable_guidance_schedules(discrete_time=True))
    app.check_request(latent, **latent_request(guidance_schedule="power-cosine", scheduler=values[1]))
    with pytest.raises(ValueError, match="Scheduler must be one of default, "):
        app.check_request(latent, **latent_request(scheduler="edm-euler"))


def test_generate_with_the_latent_model_gives_32px_images(app, latent):
    steps = []
    result = app.generate(latent, **latent_request(), on_step=lambda done, total: steps.append(done))
    assert [image.size for image in result.images] == [(32, 32)] * 4
    assert result.captions == ["3", "3", "7", "7"] and steps[-1] == len(steps) >= 2


def test_model_controls_follow_the_model(app, models, pipe, latent):
    digits, other = (app.model_controls(*models[name]) for name in ["digits", "digits-latent"])
    assert list(digits) == list(other)
    for controls, model in [(digits, pipe), (other, latent)]:
        defaults = app.recipe_defaults(model)
        assert controls["classes"]["choices"] == app.class_choices(model)
        assert controls["scheduler"]["choices"] == app.scheduler_choices(model)
        assert controls["guidance_schedule"]["choices"] == app.guidance_schedules(model)
        assert controls["steps"]["value"] == defaults.steps
        assert controls["guidance_scale"]["value"] == defaults.guidance_scale
    assert "`digits-latent`" in other["description"]["value"] and "`digits`" in digits["description"]["value"]
    values = app.Values(["5"], 1, 3, 2.0, "power-cosine", "default", 9)
    chosen = app.model_controls(*models["digits-latent"], values)
    assert chosen["classes"]["value"] == ["5"] and chosen["steps"]["value"] == 3
    assert chosen["guidance_schedule"]["value"] == "power-cosine"


def demo_function(demo, name):
    (fn,) = [fn for fn in demo.fns.values() if fn.name == name]
    return fn


def updates_by_id(fn, updates):
    return {component.elem_id: update for component, update in zip(fn.outputs, updates)}


def test_demo_picker_switches_the_choices_and_generate_takes_the_model(app, models, latent):
    demo = app.build_demo(models)
    (picker,) = [block for block in demo.blocks.values() if block.elem_id == "model"]
    assert [value for _, value in picker.choices] == ["digits", "digits-latent"] and picker.value == "digits"

    parameters = demo.get_api_info()["named_endpoints"]["/generate"]["parameters"]
    assert [p["parameter_name"] for p in parameters] == [*(f.name for f in dataclasses.fields(app.Values)), "model"]
    assert parameters[-1]["parameter_has_default"] and parameters[-1]["parameter_default"] == "digits"

    show_model = demo_function(demo, "show_model")
    switched = updates_by_id(show_model, show_model.fn("digits-latent"))
    assert switched["scheduler"]["choices"] == app.scheduler_choices(latent)
    assert switched["guidance-schedule"]["choices"] == app.guidance_schedules(latent)
    assert switched["classes"]["choices"] == app.class_choices(latent)
    assert switched["steps"]["value"] == app.recipe_defaults(latent).steps
    assert "`digits-latent`" in switched["model-description"]["value"]

    load_example = demo_function(demo, "load_example")
    index = len(app.example_rows(models["digits"][0]))  # the latent model's first example
    model, *updates = load_example.fn(index)
    assert model == "digits-latent"
    loaded = updates_by_id(load_example, [model, *updates])
    values = app.example_rows(latent)[0]
    assert loaded["scheduler"]["choices"] == app.scheduler_choices(latent)
    assert loaded["scheduler"]["value"] == values.scheduler and loaded["seed"] == values.seed
