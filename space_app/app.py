"""Gradio Space: class-conditional sampling from DiffiT pipelines, the user picking the model.

The Space serves `DIFFIT_MODEL` alone (a Hub id, a local pipeline folder, or the name of a model shipped in
`diffusers-diffit`) when it is set, else the model named in `space_config.json` next to this file (written by
`build_space.py`), else both models shipped inside `diffusers-diffit`: "digits" (a pixel-space DiffiT U-Net, the
default) and "digits-latent" (a latent DiffiT transformer with its VAE), both small enough to sample on a CPU.
The page's Model picker lists the served models (a single, fixed entry when one is configured); picking one switches
the model line, the class, scheduler and guidance-schedule choices and the recipe controls to that model's, and the
`/generate` API takes the model as its `model` input (default: the first one). Every served pipeline is loaded once,
at start. Run locally with `python space_app/app.py` (or `make demo`); `space_app/build_space.py` turns this file into
a deployable Space.

Everything a request does is in plain functions (`generate`, `check_seed`, `resolve_classes`, ...) that raise
`ValueError` with a readable message; `build_demo` only wires them to Gradio and turns those errors into `gr.Error`.
"""

import json
import logging
import math
import os
import random
import re
import threading
from dataclasses import dataclass
from pathlib import Path


try:  # ZeroGPU hardware: a GPU is attached for the duration of each decorated call (imported before torch)
    import spaces
except ImportError:
    spaces = None

import torch
from PIL import Image

from diffusers_diffit import DiffiTPipeline, embedded_model_path
from diffusers_diffit.cli import make_grid
from diffusers_diffit.embedded import EMBEDDED_MODELS
from diffusers_diffit.guidance import (
    GUIDANCE_SCHEDULES,
    describe_guidance_schedules,
    training_horizon,
    usable_guidance_schedules,
)
from diffusers_diffit.hub import download_pipeline
from diffusers_diffit.schedulers import scheduler_from_preset, scheduler_presets


logger = logging.getLogger("diffit-space")

HERE = Path(__file__).resolve().parent
SPACE_CONFIG = HERE / "space_config.json"
PACKAGE_LICENSE = "apache-2.0"  # the licence of diffusers-diffit, and so of the models shipped inside it
IMAGENET_LICENSE = "cc-by-nc-sa-4.0"  # NVIDIA's DiffiT weights; converted repositories carry it
PAPER_URL = "https://arxiv.org/abs/2312.02139"

MAX_SEED = 2**32 - 1
MAX_IMAGES = 16  # per request, over all classes
MAX_IMAGES_PER_CLASS = 8
MAX_STEPS = 250  # the official ImageNet recipe's step count
MAX_GUIDANCE = 10.0
# Requests waiting: more are turned away at once with gradio's "Queue is full ... try again" message, so that a waiting
# caller never waits longer than ~QUEUE_SIZE requests (a 16-image request takes ~3 s on a busy 2-core CPU: < 1 min)
# and memory stays bounded (a waiting request holds only its inputs; one runs).
QUEUE_SIZE = 16
CONCURRENCY = 1  # one request samples at a time: they share one model (and one GPU, or one CPU thread)
SAMPLING = "sampling"  # the concurrency group of the page's Generate and the `/generate` API: one slot for both
OWN_SCHEDULER = "default"  # the scheduler choice that keeps the model's own scheduler
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CSS = """
#gallery img, #grid img { image-rendering: pixelated; }
"""

# One request at a time uses the pipeline: each one sets its own scheduler on it for the duration of the call.
_PIPE_LOCK = threading.Lock()


# ---------------------------------------------------------------------------------------------------------------------
# The model


@dataclass
class ModelInfo:
    """What the page says about a served model."""

    model: str  # as given: the name of a model shipped in the package, a Hub id or a folder
    name: str  # as the Model picker and the API name it: the shipped model's name, the Hub id or the folder's name
    license: str
    card_url: str | None  # None: no card online
    hub_id: str | None = None
    embedded: bool = False  # shipped inside diffusers-diffit


def space_config() -> dict:
    """`space_config.json` next to this file (written by `build_space.py`), or {} without one."""
    return json.loads(SPACE_CONFIG.read_text(encoding="utf-8")) if SPACE_CONFIG.is_file() else {}


def configured_model() -> str | None:
    """The one model to serve: `DIFFIT_MODEL`, else `space_config.json`'s "model" (a folder relative to this file or a
    Hub id), else None (every model shipped in the package)."""
    if os.environ.get("DIFFIT_MODEL"):
        return os.environ["DIFFIT_MODEL"]
    model = space_config().get("model")
    if model and (HERE / model).is_dir():
        return str(HERE / model)
    return model


def card_license(folder: str | os.PathLike) -> str | None:
    """The `license` in the model card (README.md) of a pipeline folder, if there is one."""
    card = Path(folder) / "README.md"
    if not card.is_file():
        return None
    from huggingface_hub import ModelCard

    return ModelCard.load(card).data.get("license")


def model_license(folder: str | os.PathLike, num_classes: int, embedded: bool) -> str:
    """A served model's licence: the package's for a model shipped inside it, else its card's, else NVIDIA's
    weights' licence for an ImageNet (1000-class) model, else "unknown"."""
    if embedded:
        return PACKAGE_LICENSE
    license = card_license(folder)
    if license:
        return license
    return IMAGENET_LICENSE if num_classes == 1000 else "unknown"


def load_pipeline(model: str, license: str | None = None) -> tuple[DiffiTPipeline, ModelInfo]:
    """A pipeline to serve (float16 on a GPU) and what the page says about it. `model` is the name of a model shipped
    in the package (one of `EMBEDDED_MODELS`), a Hub id or a local folder; `license`, when given, replaces the one
    `model_license` finds."""
    embedded = model in EMBEDDED_MODELS
    folder = embedded_model_path(model) if embedded else download_pipeline(model)
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    pipe = DiffiTPipeline.from_pretrained(folder, dtype=dtype).to(DEVICE)
    pipe.set_progress_bar_config(disable=True)
    hub_id = None if embedded or os.path.isdir(model) else model
    info = ModelInfo(
        model=model,
        name=model if embedded else (hub_id or Path(model).name),
        license=license or model_license(folder, pipe.transformer.config.num_classes, embedded),
        card_url=PAPER_URL if embedded else (f"https://huggingface.co/{hub_id}" if hub_id else None),
        hub_id=hub_id,
        embedded=embedded,
    )
    return pipe, info


def load_pipelines() -> dict[str, tuple[DiffiTPipeline, ModelInfo]]:
    """Every model the Space serves, loaded once, by the name the Model picker shows (the first is the default): the
    configured model alone (`configured_model`), else the models shipped in the package (`EMBEDDED_MODELS`). The
    licence in `space_config.json` applies unless `DIFFIT_MODEL` is set."""
    model = configured_model()
    license = None if os.environ.get("DIFFIT_MODEL") else space_config().get("license")
    loaded = [load_pipeline(name, license) for name in ([model] if model else EMBEDDED_MODELS)]
    return {info.name: (pipe, info) for pipe, info in loaded}


def count_parameters(module: torch.nn.Module) -> float:
    """Parameters of `module`, in millions."""
    return sum(p.numel() for p in module.parameters()) / 1e6


def describe_model(pipe: DiffiTPipeline, info: ModelInfo) -> str:
    """The model line of the page (markdown)."""
    config = pipe.transformer.config
    params = count_parameters(pipe.transformer)
    side = config.sample_size * pipe.vae_scale_factor
    classes = f"{config.num_classes} classes" if config.num_classes else "unconditional"
    if info.embedded:
        network = (
            f"a {params:.2f} M-parameter DiffiT U-Net"
            if pipe.vae is None
            else f"a {params:.2f} M-parameter latent DiffiT transformer with a "
            f"{count_parameters(pipe.vae):.2f} M-parameter VAE,"
        )
        card = (
            f"{network} trained on scikit-learn's 8×8 digits ({side}×{side} px), shipped with diffusers-diffit; "
            f"[paper]({PAPER_URL})"
        )
    else:
        card = f"[model card]({info.card_url})" if info.card_url else "local folder, no card online"
    return (
        f"**Model:** `{info.name}` ({type(pipe.transformer).__name__}, {params:.2f} M parameters, "
        f"{side}×{side} px, {classes}) · **licence:** {info.license} · {card}"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Choices offered for the model


def class_choices(pipe: DiffiTPipeline) -> list[str]:
    """One entry per class: its first name, with the id added where the name also names another class ("crane
    (134)"; "partridge (86)", which is also a synonym of class 82)."""
    id2label = pipe.id2label
    owners: dict[str, set[int]] = {}
    for class_id, names in id2label.items():
        for name in names:
            owners.setdefault(name.lower(), set()).add(class_id)
    return [
        f"{names[0]} ({class_id})" if len(owners[names[0].lower()]) > 1 else names[0]
        for class_id, names in id2label.items()
    ]


def resolve_classes(pipe: DiffiTPipeline, classes: list[str] | str | None) -> list[int]:
    """Picked or typed class names -> class ids. Accepts any synonym (case-insensitive), "name (id)" as the picker
    shows shared names, and bare ids. Unknown names raise `ValueError` with the closest matches."""
    if classes is None or classes == "":
        return []
    if isinstance(classes, str):
        classes = [classes]
    id2label = pipe.id2label
    ids = []
    for entry in classes:
        if not isinstance(entry, (str, int)) or isinstance(entry, bool):
            raise ValueError(f"A class must be a name or a class id, got {entry!r}.")
        text = str(entry).strip()
        if not text:
            continue
        named = re.fullmatch(r"(.+?)\s*\((\d+)\)", text)
        if named and int(named[2]) in id2label and named[1].lower() in (n.lower() for n in id2label[int(named[2])]):
            ids.append(int(named[2]))
        elif text.isdigit() and int(text) in id2label and not any(text in names for names in id2label.values()):
            ids.append(int(text))
        else:
            try:
                ids.extend(pipe.get_label_ids(text))
            except ValueError as error:
                names = class_choices(pipe)
                hint = (
                    f"This model's classes are {', '.join(names)}."
                    if len(names) <= 20
                    else "Type part of a name in the Classes box to search the list."
                )
                raise ValueError(f"{error} {hint}") from None
    return ids


def class_name(pipe: DiffiTPipeline, class_id: int | None) -> str:
    if class_id is None:
        return "unconditional"
    return pipe.id2label[class_id][0]


def random_classes(choices: list[str], count: int = 2, rng: random.Random | None = None) -> list[str]:
    """`count` different classes drawn at random (fewer if the model has fewer)."""
    return (rng or random).sample(choices, min(count, len(choices)))


def scheduler_choices(pipe: DiffiTPipeline) -> list[tuple[str, str]]:
    """(label, value) pairs: the model's own scheduler first, then the presets valid for what it was trained for."""
    own = (f"{type(pipe.scheduler).__name__} (the model's own)", OWN_SCHEDULER)
    return [own] + [(name, name) for name in scheduler_presets(pipe.denoiser_type)]


def guidance_schedules(pipe: DiffiTPipeline) -> list[str]:
    """Guidance schedules that work with the model's scheduler family, the model's saved one first."""
    valid = usable_guidance_schedules(discrete_time=training_horizon(pipe.scheduler) is not None)
    default = pipe.config.guidance_schedule
    return [default] + [s for s in valid if s != default] if default in valid else valid


@dataclass
class Values:
    """Values of the request controls: a model's saved recipe (`recipe_defaults`) or an example (`example_rows`). The
    fields are `check_request`'s arguments, in its order, which is also the `/generate` endpoint's ("model" last)."""

    classes: list[str]
    images_per_class: int
    steps: int
    guidance_scale: float
    guidance_schedule: str
    scheduler: str = OWN_SCHEDULER
    seed: int = 0
    randomize_seed: bool = False


class ClientLeft(Exception):
    """The caller of a running request went away (closed the page, dropped the connection): sampling stops."""


def recipe_defaults(pipe: DiffiTPipeline) -> Values:
    """The model's saved recipe, as the controls' initial values."""
    return Values(
        classes=class_choices(pipe)[:2],
        images_per_class=4,
        steps=min(pipe.config.num_inference_steps, MAX_STEPS),
        guidance_scale=min(pipe.config.guidance_scale, MAX_GUIDANCE),
        guidance_schedule=guidance_schedules(pipe)[0],
    )


def example_rows(pipe: DiffiTPipeline) -> list[Values]:
    """Examples for the model: its saved recipe, on a few classes and seeds."""
    d = recipe_defaults(pipe)
    choices = class_choices(pipe)
    wanted = ["golden retriever", "volcano", "lesser panda", "macaw", "7", "3", "1"]
    picked = [name for name in wanted if name in choices][:2] or choices[:2]
    presets = scheduler_presets(pipe.denoiser_type)
    # ImageNet's own recipe is 250 DDPM steps: the examples use DPM-Solver++ with 25 instead
    scheduler = "dpmsolver" if "dpmsolver" in presets and d.steps > 50 else OWN_SCHEDULER
    recipe = dict(
        steps=25 if scheduler != OWN_SCHEDULER else d.steps,
        guidance_schedule=d.guidance_schedule,
        scheduler=scheduler,
    )
    rows = [
        Values(picked, 4, guidance_scale=d.guidance_scale, seed=0, **recipe),
        Values(choices[:8], 1, guidance_scale=d.guidance_scale, seed=1, **recipe),
    ]
    if pipe.transformer.config.num_classes > 0:
        rows.append(Values(picked[:1], 4, guidance_scale=d.guidance_scale + 1.0, seed=2, **recipe))
    rows.append(Values([], 4, guidance_scale=d.guidance_scale, seed=3, **recipe))
    return rows


def model_controls(pipe: DiffiTPipeline, info: ModelInfo, values: Values | None = None) -> dict[str, dict]:
    """Keyword arguments of the page's components that change with the model, by component: the model line, the
    model's class, guidance-schedule and scheduler choices, and `values` (default: the model's saved recipe) for the
    classes and the sampling settings."""
    values = values or recipe_defaults(pipe)
    choices = class_choices(pipe)
    conditional = pipe.transformer.config.num_classes > 0
    schedules = guidance_schedules(pipe)
    return {
        "description": dict(value=describe_model(pipe, info)),
        "classes": dict(
            choices=choices,
            value=values.classes if conditional else [],
            interactive=conditional,
            info=(
                f"Type to search the model's {len(choices)} classes; empty = unconditional samples."
                if conditional
                else "This model is unconditional."
            ),
        ),
        "random_classes": dict(visible=conditional),
        "steps": dict(value=values.steps),
        "guidance_scale": dict(value=values.guidance_scale, interactive=conditional),
        "guidance_schedule": dict(
            choices=schedules, value=values.guidance_schedule, info=describe_guidance_schedules(schedules)
        ),
        "scheduler": dict(choices=scheduler_choices(pipe), value=values.scheduler),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Checking a request


def check_seed(seed, randomize: bool, rng: random.Random | None = None) -> int:
    """The seed to use: a fresh random one when `randomize`, else `seed` as an int in [0, MAX_SEED]."""
    if randomize:
        return (rng or random).randint(0, MAX_SEED)
    allowed = f"a whole number from 0 to {MAX_SEED}"
    if seed is None or (isinstance(seed, str) and not seed.strip()):
        raise ValueError(f'The seed is empty: enter {allowed}, or tick "Randomize seed".')
    if isinstance(seed, str):
        if not re.fullmatch(r"\s*\d+\s*", seed):
            raise ValueError(f"The seed must be {allowed}, got {seed!r}.")
        seed = int(seed)
    if isinstance(seed, bool) or not isinstance(seed, (int, float)):
        raise ValueError(f"The seed must be {allowed}, got {seed!r}.")
    if isinstance(seed, float) and (not math.isfinite(seed) or seed != int(seed)):
        raise ValueError(f"The seed must be {allowed}, got {seed}.")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"The seed must be {allowed}; {int(seed)} is too {'large' if seed > 0 else 'small'}.")
    return int(seed)


def check_int(label: str, value, low: int, high: int) -> int:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value != int(value):
        raise ValueError(f"{label} must be a whole number from {low} to {high}, got {value!r}.")
    if not low <= value <= high:
        raise ValueError(f"{label} must be from {low} to {high}, got {int(value)}.")
    return int(value)


def check_float(label: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{label} must be a number from {low} to {high}, got {value!r}.")
    if not low <= value <= high:
        raise ValueError(f"{label} must be from {low} to {high}, got {value}.")
    return float(value)


def check_choice(label: str, value, choices: list[str]) -> str:
    if value not in choices:
        raise ValueError(f"{label} must be one of {', '.join(map(str, choices))}; got {value!r}.")
    return value


def pick_model(models: dict[str, tuple[DiffiTPipeline, ModelInfo]], model: str) -> tuple[DiffiTPipeline, ModelInfo]:
    """The served pipeline (and its `ModelInfo`) a request names; `ValueError` for a model not served."""
    return models[check_choice("Model", model, list(models))]


# ---------------------------------------------------------------------------------------------------------------------
# Sampling


@dataclass
class Request:
    """A checked request: class ids (empty = unconditional) and the sampling settings."""

    class_ids: list[int]
    images_per_class: int
    steps: int
    guidance_scale: float
    guidance_schedule: str
    scheduler: str
    seed: int


@dataclass
class Result:
    images: list[Image.Image]
    captions: list[str]
    grid: Image.Image
    seed: int


def request_scheduler(pipe: DiffiTPipeline, name: str):
    """A fresh scheduler for one request (the loaded one is never changed): a copy of the model's own, or a preset
    built from its config."""
    if name == OWN_SCHEDULER:
        return type(pipe.scheduler).from_config(pipe.scheduler.config)
    return scheduler_from_preset(name, pipe.scheduler)


def check_request(
    pipe: DiffiTPipeline,
    classes: list[str] | str | None,
    images_per_class: int,
    steps: int,
    guidance_scale: float,
    guidance_schedule: str,
    scheduler: str,
    seed: int | None,
    randomize_seed: bool = False,
) -> Request:
    """The page's values -> a `Request`; a mistake raises `ValueError` saying, in plain words, what to change. A
    sampling setting that is None (steps, guidance_scale, guidance_schedule, scheduler; an API call that leaves it
    out) is the model's saved recipe."""
    recipe = recipe_defaults(pipe)
    steps = recipe.steps if steps is None else steps
    guidance_scale = recipe.guidance_scale if guidance_scale is None else guidance_scale
    guidance_schedule = recipe.guidance_schedule if guidance_schedule is None else guidance_schedule
    scheduler = recipe.scheduler if scheduler is None else scheduler
    ids = resolve_classes(pipe, classes)
    if ids and not pipe.transformer.config.num_classes:
        raise ValueError("This model is unconditional: leave the classes empty.")
    per_class = check_int("Images per class", images_per_class, 1, MAX_IMAGES_PER_CLASS)
    total = max(1, len(ids)) * per_class
    if total > MAX_IMAGES:
        raise ValueError(
            f"That is {total} images ({len(ids)} classes × {per_class} per class); this Space makes at most "
            f"{MAX_IMAGES} per request. Pick fewer classes or fewer images per class."
        )
    steps = check_int("Steps", steps, 1, MAX_STEPS)
    guidance_scale = check_float("Guidance scale", guidance_scale, 1.0, MAX_GUIDANCE)
    scheduler = check_choice("Scheduler", scheduler, [value for _, value in scheduler_choices(pipe)])
    guidance_schedule = check_choice("Guidance schedule", guidance_schedule, list(GUIDANCE_SCHEDULES))
    guided = ids and guidance_scale != 1
    needs_discrete_time = GUIDANCE_SCHEDULES[guidance_schedule].needs_discrete_time
    if guided and needs_discrete_time and training_horizon(request_scheduler(pipe, scheduler)) is None:
        raise ValueError(
            f"The {guidance_schedule} guidance schedule needs a discrete-time scheduler (DDPM, DDIM, DPM-Solver, "
            f"...); {scheduler_label(pipe, scheduler)} is not one. Choose the "
            f"{' or '.join(usable_guidance_schedules(discrete_time=False))} schedule."
        )
    seed = check_seed(seed, randomize_seed)
    return Request(ids, per_class, steps, guidance_scale, guidance_schedule, scheduler, seed)


def scheduler_label(pipe: DiffiTPipeline, value: str) -> str:
    return dict((v, label) for label, v in scheduler_choices(pipe))[value]


def sample(pipe: DiffiTPipeline, request: Request, on_step=None, client_left=None) -> Result:
    """Run a checked request. `on_step(done, total)` is called after every denoising step; when `client_left()` says
    True after a step, sampling stops there with `ClientLeft` (the pipeline's lock and scheduler are released)."""

    def callback(pipeline, step, timestep, tensors):
        if on_step is not None:
            on_step(step + 1, pipeline.num_timesteps)
        if client_left is not None and client_left():
            raise ClientLeft(f"The client left; stopped after step {step + 1} of {pipeline.num_timesteps}.")
        return tensors

    with _PIPE_LOCK:
        loaded = pipe.scheduler
        pipe.scheduler = request_scheduler(pipe, request.scheduler)
        try:
            images = pipe(
                request.class_ids or None,
                num_images_per_label=request.images_per_class,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale,
                guidance_schedule=request.guidance_schedule,
                generator=torch.Generator("cpu").manual_seed(request.seed),
                callback_on_step_end=callback,
            ).images
        finally:
            pipe.scheduler = loaded

    per_class = request.images_per_class
    captions = [class_name(pipe, class_id) for class_id in (request.class_ids or [None]) for _ in range(per_class)]
    upscale = max(1, 512 // (images[0].width * per_class))
    return Result(images, captions, make_grid(images, per_class, upscale), request.seed)


def generate(pipe: DiffiTPipeline, *args, on_step=None, client_left=None, **kwargs) -> Result:
    """`check_request` then `sample`: the arguments of `check_request` (classes, images_per_class, steps,
    guidance_scale, guidance_schedule, scheduler, seed, randomize_seed) -> images, captions, grid and the seed used."""
    return sample(pipe, check_request(pipe, *args, **kwargs), on_step=on_step, client_left=client_left)


# ---------------------------------------------------------------------------------------------------------------------
# The page


def gradio_client_left() -> bool:
    """Whether the caller of the gradio event running in this thread has gone (closed the page or dropped the
    connection). Gradio 6 then drops the event's waiting entries and marks the running one dead, but lets a running
    function finish; the run asks this after every step and stops, freeing its slot for the next caller. False outside
    a gradio event."""
    from gradio.context import LocalContext

    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    if blocks is None or event_id is None:
        return False
    events = [event for job in blocks._queue.active_jobs if job for event in job if event._id == event_id]
    return bool(events) and not any(event.alive for event in events)


def on_gpu(fn):
    """`spaces.GPU` on ZeroGPU hardware (the `spaces` package is there); unchanged elsewhere."""
    return spaces.GPU(duration=120)(fn) if spaces is not None else fn


def example_cells(pipe: DiffiTPipeline, name: str, values: Values) -> list:
    """An example of model `name` as the page's Examples table shows it: the model, classes, images per class, steps,
    guidance scale, guidance schedule, scheduler (labelled as in the model's Scheduler choices) and seed."""
    return [
        name,
        ", ".join(values.classes) or "none (unconditional)",
        values.images_per_class,
        values.steps,
        values.guidance_scale,
        values.guidance_schedule,
        scheduler_label(pipe, values.scheduler),
        values.seed,
    ]


def build_demo(models: dict[str, tuple[DiffiTPipeline, ModelInfo]]):
    """The page for `models` (as `load_pipelines` returns them; the first is the default): a Model picker, the
    request controls of the picked model, the images, and examples of every model."""
    import gradio as gr

    default = next(iter(models))
    examples = [(name, values) for name, (pipe, _) in models.items() for values in example_rows(pipe)]

    def check(
        classes, images_per_class, steps, guidance_scale, guidance_schedule, scheduler, seed, randomize_seed, model
    ):
        """Runs before `run`, without outputs: a mistake shows as a message and the previous images stay."""
        try:
            pipe, _ = pick_model(models, model)
            check_request(
                pipe,
                classes,
                images_per_class,
                steps,
                guidance_scale,
                guidance_schedule,
                scheduler,
                seed,
                randomize_seed,
            )
        except ValueError as error:
            raise gr.Error(str(error), duration=None, print_exception=False) from None

    @on_gpu
    def run(
        classes,
        images_per_class,
        steps=None,
        guidance_scale=None,
        guidance_schedule=None,
        scheduler=None,
        seed=None,
        randomize_seed=False,
        model=default,
        progress=gr.Progress(),
    ):
        """Sample images: returns the gallery (PNG files with their class names), the grid and the seed used. A
        sampling setting left out (None) is the model's saved recipe."""
        progress(0, desc="Starting")
        try:
            pipe, _ = pick_model(models, model)
            request = check_request(
                pipe,
                classes,
                images_per_class,
                steps,
                guidance_scale,
                guidance_schedule,
                scheduler,
                seed,
                randomize_seed,
            )
            result = sample(
                pipe,
                request,
                on_step=lambda done, total: progress((done, total), desc="Denoising", unit="steps"),
                client_left=gradio_client_left,
            )
        except ValueError as error:  # the user's mistake (API calls skip `check`): say what to change
            raise gr.Error(str(error), duration=None, print_exception=False) from None
        except ClientLeft as error:  # nobody reads the answer; the slot is free for the next caller
            logger.info("%s", error)
            raise gr.Error(str(error), print_exception=False) from None
        except torch.OutOfMemoryError:
            raise gr.Error("The GPU ran out of memory: ask for fewer images.", duration=None) from None
        return list(zip(result.images, result.captions)), result.grid, result.seed

    d = recipe_defaults(models[default][0])
    controls = model_controls(*models[default], d)
    with gr.Blocks(title="DiffiT") as demo:
        gr.Markdown(
            "# DiffiT: Diffusion Vision Transformers\n"
            "Class-conditional image generation with [DiffiT](" + PAPER_URL + ") (ECCV 2024) in diffusers "
            "(`diffusers-diffit`)."
        )
        model = gr.Radio(
            list(models),
            value=default,
            label="Model",
            elem_id="model",
            interactive=len(models) > 1,
            info="Picking a model sets the classes and sampling settings to its own.",
        )
        description = gr.Markdown(**controls["description"], elem_id="model-description")
        with gr.Row():
            with gr.Column(scale=2):
                classes = gr.Dropdown(
                    **controls["classes"],
                    multiselect=True,
                    filterable=True,
                    allow_custom_value=True,
                    label="Classes",
                    elem_id="classes",
                )
                random_button = gr.Button(
                    "Random classes", **controls["random_classes"], size="sm", elem_id="random-classes"
                )
                images_per_class = gr.Slider(
                    1,
                    MAX_IMAGES_PER_CLASS,
                    value=d.images_per_class,
                    step=1,
                    label="Images per class",
                    elem_id="images-per-class",
                    info=f"At most {MAX_IMAGES} images per request.",
                )
                with gr.Row():
                    seed = gr.Number(value=d.seed, precision=0, label="Seed", elem_id="seed", info=f"0 to {MAX_SEED}")
                    randomize_seed = gr.Checkbox(
                        value=d.randomize_seed, label="Randomize seed", elem_id="randomize-seed"
                    )
                with gr.Accordion("Sampling settings (the model's saved recipe)", open=False):
                    steps = gr.Slider(1, MAX_STEPS, **controls["steps"], step=1, label="Steps", elem_id="steps")
                    guidance_scale = gr.Slider(
                        1.0,
                        MAX_GUIDANCE,
                        **controls["guidance_scale"],
                        step=0.05,
                        label="Guidance scale",
                        elem_id="guidance-scale",
                        info="1 = no classifier-free guidance",
                    )
                    # custom values let an API call for another model than the default send that model's choices
                    # (`check_request` checks them)
                    guidance_schedule = gr.Dropdown(
                        **controls["guidance_schedule"],
                        allow_custom_value=True,
                        label="Guidance schedule",
                        elem_id="guidance-schedule",
                    )
                    scheduler = gr.Dropdown(
                        **controls["scheduler"], allow_custom_value=True, label="Scheduler", elem_id="scheduler"
                    )
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=3):
                gallery = gr.Gallery(
                    label="Samples",
                    format="png",
                    columns=4,
                    object_fit="contain",
                    height="auto",
                    buttons=["download", "fullscreen"],
                    interactive=False,
                    elem_id="gallery",
                )
                grid = gr.Image(
                    label="Grid (one row per class)",
                    type="pil",
                    format="png",
                    show_label=False,
                    interactive=False,
                    buttons=["download", "fullscreen"],
                    elem_id="grid",
                )
        inputs = [classes, images_per_class, steps, guidance_scale, guidance_schedule, scheduler, seed, randomize_seed]
        # what changes with the model, in the order of `model_controls`
        controlled = [description, classes, random_button, steps, guidance_scale, guidance_schedule, scheduler]
        # not `gr.Examples`: an example also switches the model, so it sets the model's choices with its values, and
        # the table shows them as text (the Dropdowns' labels are the default model's)
        text = [gr.Textbox(label=label, render=False) for label in ["Classes", "Guidance schedule", "Scheduler"]]
        example_table = gr.Dataset(
            components=[model, text[0], images_per_class, steps, guidance_scale, text[1], text[2], seed],
            samples=[example_cells(models[name][0], name, values) for name, values in examples],
            type="index",
            label="Examples",
            elem_id="examples",
        )
        # the `/generate` API's sampling settings: left out (None), they are the picked model's saved recipe, not the
        # page's first values (which are the default model's)
        recipe_inputs = [
            gr.Number(None, label="Steps", visible=False),
            gr.Number(None, label="Guidance scale", visible=False),
            gr.Textbox(None, label="Guidance schedule", visible=False),
            gr.Textbox(None, label="Scheduler", visible=False),
        ]
        api_trigger = gr.Button(visible=False)
        gr.Markdown(
            f"One request runs at a time (at most {QUEUE_SIZE} wait; more are asked to try again). Images are "
            "lossless PNGs at the model's "
            "resolution: open one in the gallery to download it. API: `gradio_client.Client(url).predict(..., "
            'model=..., api_name="/generate")`, see the Space README.'
        )

        def show_model(name):
            """The picked model's line, choices and saved recipe."""
            return [gr.update(**kwargs) for kwargs in model_controls(*models[name]).values()]

        def load_example(index):
            """The example's model, with its choices, and the example's values."""
            name, values = examples[index]
            updates = [gr.update(**kwargs) for kwargs in model_controls(*models[name], values).values()]
            return [name, *updates, values.images_per_class, values.seed, values.randomize_seed]

        generate_button.click(check, [*inputs, model], None, concurrency_limit=None, api_visibility="private").success(
            run,
            [*inputs, model],
            [gallery, grid, seed],
            api_visibility="private",
            concurrency_limit=CONCURRENCY,
            concurrency_id=SAMPLING,
            show_progress_on=[gallery, grid],
        )
        api_trigger.click(
            run,
            [classes, images_per_class, *recipe_inputs, seed, randomize_seed, model],
            [gallery, grid, seed],
            api_name="generate",
            concurrency_limit=CONCURRENCY,
            concurrency_id=SAMPLING,
        )
        model.input(show_model, model, controlled, api_visibility="private", queue=False)
        example_table.click(
            load_example,
            example_table,
            [model, *controlled, images_per_class, seed, randomize_seed],
            api_visibility="private",
            queue=False,
        )
        random_button.click(
            lambda name: random_classes(class_choices(models[name][0]), random.randint(2, 4)),
            model,
            classes,
            api_visibility="private",
            queue=False,
        )
    return demo


def launch(demo, queue_size: int = QUEUE_SIZE, **kwargs):
    """Queue with a concurrency limit and at most `queue_size` waiting requests, then serve (kwargs go to
    `Blocks.launch`)."""
    return demo.queue(max_size=queue_size, default_concurrency_limit=CONCURRENCY).launch(css=CSS, **kwargs)


def main():
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if DEVICE == "cpu":
        # One thread by default: the digits model is too small to gain from more, and on a busy 2-core machine two
        # threads took 28-45 s for the default request where one took 1.1 s (OpenMP threads waiting on each other).
        torch.set_num_threads(int(os.environ.get("DIFFIT_CPU_THREADS", "1")))
    models = load_pipelines()
    for _, info in models.values():
        logger.info("Serving %s (%s) on %s", info.name, info.license, DEVICE)
    launch(build_demo(models))


if __name__ == "__main__":
    main()
