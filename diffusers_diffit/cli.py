"""The `diffit` console script.

    diffit sample --labels 3 1 4 --num-images-per-label 8 --output grid.png

samples a grid (one row per label) from a DiffiT pipeline: by default the digits model shipped inside the package,
so it works offline on a fresh machine; `--model` takes the other shipped model (`digits-latent`, a latent DiffiT
with its VAE), any local pipeline folder or a Hub id.

Every argument is checked before a model is loaded: against its type and range first, then against the model's
saved configuration (class ids and names, schedulers, guidance of unconditional models), which is read from the JSON
files alone. A mistake ends with one line on stderr, `diffit sample: error: argument --labels: ...`, and exit
status 2, and no output file; `--debug` shows tracebacks.
"""

import argparse
import json
import logging
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .embedded import EMBEDDED_MODELS, embedded_model_path
from .evaluation.evaluator import add_evaluate_parser, run_evaluate
from .guidance import GUIDANCE_SCHEDULES, describe_guidance_schedules, usable_guidance_schedules
from .labels import imagenet_id2label, lookup_label_ids, normalize_id2label
from .schedulers.compatibility import PRESETS, infer_denoiser_type, scheduler_presets
from .utils import is_finite_number


logger = logging.getLogger("diffit")

MAX_IMAGES = 1024  # beyond this a grid is unreadable
CPU_BATCH = 16  # --max-batch-size on a CPU by default: bounded memory, and no speed lost to larger batches there
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range
MAX_UPSCALE = 64
DEBUG_HELP = "show Python tracebacks on errors"
OUTPUT_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}


class UsageError(Exception):
    """A user mistake in argument `option`: reported as `prog: error: argument OPTION: message`, exit status 2."""

    def __init__(self, option: str, message: str):
        super().__init__(f"argument {option}: {message}")


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line on stderr (no usage block) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


# ----------------------------------------------------------------------------------------------- argument types
def integer(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: an integer is required") from None
        if value < low or (high is not None and value > high):
            allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"invalid value {value}: must be {allowed}")
        return value

    return parse


def guidance_scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: a number is required") from None
    if not is_finite_number(value) or value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be a finite number >= 1 (1 = no guidance)")
    return value


def parse_guidance_interval(tokens: list[str] | None) -> list[float] | str | None:
    """`LOW HIGH` -> [low, high]; `all` -> "all" (guidance at every step); None -> None (the pipeline's)."""
    if tokens is None or tokens == ["all"]:
        return None if tokens is None else "all"
    try:
        values = [float(token) for token in tokens]
    except ValueError:
        values = []
    if len(values) != 2 or not all(map(is_finite_number, values)) or values[0] > values[1]:
        raise UsageError(
            "--guidance-interval", f"invalid value {' '.join(tokens)!r}: give LOW HIGH (finite, LOW <= HIGH) or 'all'"
        )
    return values


def output_path(text: str) -> Path:
    path = Path(text).expanduser()
    if text.endswith(("/", os.sep)) or path.is_dir():
        example = f"{text.rstrip('/')}/grid.png"
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file name such as {example}")
    if path.suffix.lower() not in OUTPUT_FORMATS:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no image extension; use one of {', '.join(sorted(OUTPUT_FORMATS))} (e.g. grid.png)"
        )
    existing = next(p for p in [path.absolute().parent, *path.absolute().parents] if p.exists())
    try:  # the folder (or the nearest one that exists, where the missing ones will be made) takes a file
        tempfile.TemporaryFile(dir=existing).close()
    except OSError:
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {existing} is not a writable directory") from None
    return path


def device(text: str) -> str:
    import torch

    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"invalid device {text!r}: use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine (use cpu)")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine (use cpu)")
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"invalid device {text!r}: use cpu, cuda, cuda:N or mps")
    return text


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="diffit", description="DiffiT (Diffusion Vision Transformers) for diffusers.")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sample = commands.add_parser(
        "sample",
        help="sample a grid of images, one row per label",
        description="Sample a grid of images from a DiffiT pipeline, one row per label.",
    )
    sample.add_argument(
        "--model",
        default=None,
        help="a model shipped in the package (digits, digits-latent), a local pipeline folder or a Hub id "
        "(default: digits)",
    )
    sample.add_argument(
        "--labels",
        nargs="+",
        default=None,
        help="class ids or names (quote names with spaces); omit for unconditional samples",
    )
    sample.add_argument(
        "--num-images-per-label",
        type=integer(1, MAX_IMAGES),
        default=8,
        metavar="N",
        help=f"images per label (at most {MAX_IMAGES} images in all)",
    )
    sample.add_argument("--steps", type=integer(1), default=None, help="scheduler steps (default: the pipeline's)")
    sample.add_argument(
        "--guidance-scale",
        type=guidance_scale,
        default=None,
        help="classifier-free guidance w >= 1, 1 = none (default: the pipeline's)",
    )
    sample.add_argument(
        "--guidance-schedule",
        choices=list(GUIDANCE_SCHEDULES),
        default=None,
        metavar="NAME",
        help="the guidance weight w(t) at each step (default: the pipeline's): " + describe_guidance_schedules(),
    )
    sample.add_argument(
        "--guidance-interval",
        nargs="+",
        default=None,
        metavar="T",
        help="guide only at steps with LOW <= t <= HIGH (in the scheduler's timestep units), or 'all' "
        "for every step (default: the pipeline's)",
    )
    sample.add_argument(
        "--scheduler",
        choices=list(PRESETS),
        default=None,
        metavar="NAME",
        help="replace the pipeline's scheduler by a preset that can drive its model: "
        + ", ".join(f"{kind}: {' '.join(scheduler_presets(kind))}" for kind in ("edm", "ddpm")),
    )
    sample.add_argument("--seed", type=integer(0, MAX_SEED), default=0)
    sample.add_argument(
        "--max-batch-size",
        type=integer(1),
        default=None,
        metavar="N",
        help=f"sample at most N images at once, more in batches (default: {CPU_BATCH} on a CPU, all at once on a GPU); "
        "a batch that cannot fit in memory is refused before sampling",
    )
    sample.add_argument("--device", type=device, default=None, help="cpu, cuda, cuda:N or mps (default: cuda if any)")
    sample.add_argument(
        "--upscale",
        type=integer(1, MAX_UPSCALE),
        default=None,
        help="nearest-neighbour zoom of each image (default: enough to make it at least 64 px)",
    )
    sample.add_argument(
        "--output",
        type=output_path,
        default=Path("grid.png"),
        help=f"image file to write ({', '.join(sorted(OUTPUT_FORMATS))}; default grid.png)",
    )
    sample.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    sample.set_defaults(run=sample_command)
    evaluate = add_evaluate_parser(commands)
    evaluate.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    evaluate.set_defaults(run=run_evaluate)
    return parser


# ----------------------------------------------------------------------------------------------- checks by config
@dataclass
class ModelInfo:
    """What the checks need from a pipeline folder, read from its JSON files without loading weights."""

    folder: str
    num_classes: int
    id2label: dict[int, list[str]]
    denoiser_type: str
    num_train_timesteps: int | None  # discrete-time schedulers: the most steps they can take


def resolve_model(model: str | None) -> str:
    """A local pipeline folder, or the snapshot of a Hub id; a path that does not exist is reported as such."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if model is None:
        return embedded_model_path("digits")
    if model in EMBEDDED_MODELS:
        return embedded_model_path(model)
    if not model.strip():
        raise UsageError("--model", "empty value: give a pipeline folder or a Hub id (omit it for the digits model)")
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UsageError("--model", f"{model!r} is a folder but not a pipeline (no model_index.json in it)")
        return str(path)
    try:
        validate_repo_id(model)
    except HFValidationError:
        raise UsageError("--model", f"no such folder {model!r} (and not a Hub id of the form user/name)") from None
    if path.exists() or model.startswith((".", "/", "~")) or (os.sep in model and model.count("/") != 1):
        raise UsageError("--model", f"no such pipeline folder {model!r}")
    from .hub import download_pipeline

    try:
        return download_pipeline(model)
    except Exception as error:  # offline, unknown repo, no access: one line saying which
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(
            "--model", f"{model!r} is neither a local folder nor a Hub repo that could be fetched ({reason})"
        ) from error


def read_model_info(folder: str) -> ModelInfo:
    index = json.loads(Path(folder, "model_index.json").read_text())
    transformer = json.loads(Path(folder, "transformer", "config.json").read_text())
    scheduler = json.loads(Path(folder, "scheduler", "scheduler_config.json").read_text())
    num_classes = transformer.get("num_classes", 0)
    if index.get("id2label"):
        id2label = normalize_id2label(index["id2label"])
    else:
        id2label = imagenet_id2label() if num_classes == 1000 else {}
    denoiser_type = index.get("denoiser_type") or infer_denoiser_type(scheduler["_class_name"])
    horizon = scheduler.get("num_train_timesteps") if denoiser_type == "ddpm" else None
    return ModelInfo(folder, num_classes, id2label, denoiser_type, horizon)


def parse_labels(tokens: list[str] | None) -> list[int | str] | None:
    """Command-line tokens -> class ids (tokens that are integers, e.g. "3" or "-1") and names."""
    if tokens is None:
        return None
    return [int(token) if token.strip().lstrip("+-").isdigit() else token for token in tokens]


def check_labels(labels: list[int | str] | None, info: ModelInfo) -> list[int] | None:
    """Ids and names -> class ids of the model, or a `UsageError` naming the token and what is allowed."""
    if labels is None:
        return None
    if info.num_classes == 0:
        raise UsageError("--labels", "this model is unconditional (no classes); omit --labels")
    ids = []
    for label in labels:
        if isinstance(label, int):
            if not 0 <= label < info.num_classes:
                raise UsageError("--labels", f"invalid class id {label}: must be in [0, {info.num_classes - 1}]")
            ids.append(label)
            continue
        if not info.id2label:
            raise UsageError(
                "--labels",
                f"invalid label {label!r}: this model has no class names; use class ids 0 to {info.num_classes - 1}",
            )
        try:
            ids.extend(lookup_label_ids(label, info.id2label))
        except ValueError as error:
            names = [names[0] for names in info.id2label.values()]
            allowed = f"names: {', '.join(names)}" if len(names) <= 20 else "names from the model's id2label"
            ids_allowed = f"class ids 0 to {info.num_classes - 1}"
            raise UsageError("--labels", f"{error} Allowed: {ids_allowed}, or {allowed}.") from None
    return ids


def check_sample_args(args: argparse.Namespace) -> ModelInfo:
    """Everything about `diffit sample`'s arguments that depends on the model, from its saved configuration."""
    info = read_model_info(resolve_model(args.model))
    args.class_ids = check_labels(parse_labels(args.labels), info)
    args.interval = parse_guidance_interval(args.guidance_interval)
    total = args.num_images_per_label * (len(args.class_ids) if args.class_ids else 1)
    if total > MAX_IMAGES:
        raise UsageError("--num-images-per-label", f"{total} images asked for; at most {MAX_IMAGES} per run")
    if args.scheduler is not None and args.scheduler not in scheduler_presets(info.denoiser_type):
        raise UsageError(
            "--scheduler",
            f"{args.scheduler!r} cannot drive this {info.denoiser_type!r} model; "
            f"choose from {', '.join(scheduler_presets(info.denoiser_type))}",
        )
    if args.guidance_scale not in (None, 1.0) and info.num_classes == 0:
        raise UsageError(
            "--guidance-scale",
            f"{args.guidance_scale} needs a class-conditional model; this one is unconditional (use 1 or omit it)",
        )
    discrete_time = info.num_train_timesteps is not None  # the model's scheduler and its presets are of one kind
    if args.guidance_schedule is not None and args.guidance_schedule not in usable_guidance_schedules(discrete_time):
        raise UsageError(
            "--guidance-schedule",
            f"{args.guidance_schedule!r} needs a discrete-time scheduler, and "
            f"this {info.denoiser_type!r} model samples in EDM σ-space; choose "
            f"from {', '.join(usable_guidance_schedules(discrete_time))}",
        )
    if args.steps is not None and info.num_train_timesteps is not None and args.steps > info.num_train_timesteps:
        raise UsageError(
            "--steps",
            f"invalid value {args.steps}: this model's scheduler takes at most {info.num_train_timesteps} steps",
        )
    return info


# ----------------------------------------------------------------------------------------------- the work
def make_grid(images: list[Image.Image], columns: int, upscale: int) -> Image.Image:
    """Images (all one size) -> one image, `columns` per row, each zoomed `upscale`× (nearest), 2-px gaps."""
    width, height = images[0].width * upscale, images[0].height * upscale
    rows, gap = math.ceil(len(images) / columns), 2
    grid = Image.new(images[0].mode, (columns * (width + gap) - gap, rows * (height + gap) - gap))
    for i, image in enumerate(images):
        tile = image.resize((width, height), Image.Resampling.NEAREST)
        grid.paste(tile, ((i % columns) * (width + gap), (i // columns) * (height + gap)))
    return grid


def sample_command(args: argparse.Namespace) -> Path:
    info = check_sample_args(args)
    import torch

    from .pipelines import DiffiTPipeline
    from .schedulers import scheduler_from_preset

    device = args.device or default_device()
    pipe = DiffiTPipeline.from_pretrained(info.folder).to(device)
    if args.scheduler is not None:
        pipe.scheduler = scheduler_from_preset(args.scheduler, pipe.scheduler, pipe.denoiser_type)
    generator = torch.Generator(device).manual_seed(args.seed)
    images = pipe(
        args.class_ids,
        num_images_per_label=args.num_images_per_label,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        guidance_schedule=args.guidance_schedule,
        guidance_interval=args.interval,
        max_batch_size=args.max_batch_size or (CPU_BATCH if torch.device(device).type == "cpu" else None),
        generator=generator,
    ).images
    upscale = args.upscale or max(1, math.ceil(64 / images[0].width))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    partial = args.output.with_name(f".{args.output.name}.partial")
    grid = make_grid(images, args.num_images_per_label, upscale)
    grid.save(partial, format=OUTPUT_FORMATS[args.output.suffix.lower()])
    partial.replace(args.output)  # a finished file or none
    logger.info("wrote %s", args.output)
    return args.output


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)  # type and range mistakes: one line, exit 2 (Parser.error)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prog = f"{parser.prog} {args.command}"
    try:
        args.run(args)
    except (UsageError, ValueError, FileNotFoundError) as error:  # a mistake in the arguments or the user's files
        if args.debug:
            raise
        print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - anything else: one line, the traceback with --debug
        if args.debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        hint = "(run with --debug for the traceback)"
        print(f"{prog}: error: {type(error).__name__}: {message} {hint}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
