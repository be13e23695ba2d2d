"""LoRA fine-tuning of digits-latent, judged by the digits benchmark (issue 23): a new style and new classes.

    # (a) style: the digits rotated by 90°, fine-tuned from the shipped model, judged after rotating back
    python -m benchmarks.lora_study prepare /work/lora_work/images_all /work/lora_work/images_rot90
    python examples/precompute_latents.py --vae diffusers_diffit/embedded/digits-latent/vae \
        --train_data_dir /work/lora_work/images_rot90 --resolution 32 --output_dir /work/lora_work/latents_rot90
    FLAGS="--objective ddpm-hybrid --max_train_steps 500 --train_batch_size 64 --learning_rate 1e-3 \
        --lr_scheduler constant_with_warmup --lr_warmup_steps 200 --max_grad_norm 0 --label_dropout 0.1 \
        --checkpointing_steps 500 --report_to none"   # the shipped recipe without EMA
    accelerate launch examples/train_diffit.py $FLAGS --lora_rank 8 --output_dir outputs/lora-rot90 \
        --pretrained_model_name_or_path diffusers_diffit/embedded/digits-latent --latents_dir /work/lora_work/latents_rot90
    accelerate launch examples/train_diffit.py $FLAGS --output_dir outputs/full-rot90 \
        --pretrained_model_name_or_path diffusers_diffit/embedded/digits-latent --latents_dir /work/lora_work/latents_rot90
    python -m benchmarks.lora_study judge --name lora-rot90 --base diffusers_diffit/embedded/digits-latent \
        --lora outputs/lora-rot90 --undo rot90
    python -m benchmarks.lora_study judge --name full-rot90 --base outputs/full-rot90 --undo rot90
    # (b) new classes: a base trained on digits 0-6 (examples/digits_latent.args), extended to 7-9 on all ten
    accelerate launch examples/train_diffit.py $FLAGS --lora_rank 8 --output_dir outputs/lora-new789 \
        --pretrained_model_name_or_path outputs/base-0to6 --latents_dir latents-of-all-ten-digits
    python -m benchmarks.lora_study judge --name base-0to6 --base outputs/base-0to6 --groups 0-6 --per-class 50 \
        --seeds 0 1 2 3 4
    python -m benchmarks.lora_study judge --name lora-new789 --base outputs/base-0to6 --lora outputs/lora-new789 \
        --groups 0-6 7-9 --per-class 50 --seeds 0 1 2 3 4

`judge` samples each class with the pipeline's saved recipe (scheduler, steps, guidance) from one CPU generator
per seed, maps the images back to 8×8 ink, undoes the transform (a rotation of the 32-px image is the same rotation
of its ink: the bilinear up-sampling is symmetric in both axes) and scores them with the digits judge
(`diffusers_diffit.evaluation.digits`): accuracy over all sampled classes, and accuracy per group of classes
(`--groups 0-6 7-9`). One JSON line per seed goes to `benchmarks/results/lora_digits_latent.jsonl`.
"""

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusers_diffit import DiffiTPipeline
from diffusers_diffit.data.digits import digits_split
from diffusers_diffit.evaluation.digits import DigitsJudge, sample_digit_ink
from diffusers_diffit.pipelines import RECIPE_KEYS


logger = logging.getLogger(__name__)
DEFAULT_RESULTS = Path(__file__).parent / "results" / "lora_digits_latent.jsonl"
UNDO = {"none": lambda ink: ink, "rot90": lambda ink: np.rot90(ink, k=-1, axes=(1, 2))}


def prepare(args: argparse.Namespace) -> None:
    """Copy an image folder (one sub-folder per class) with every image rotated by 90° counter-clockwise."""
    if args.output_dir.exists() and any(args.output_dir.iterdir()):
        raise ValueError(f"`output_dir` {str(args.output_dir)!r} is not empty.")
    count = 0
    for path in sorted(args.image_dir.glob("*/*.png")):
        target = args.output_dir / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            image.transpose(Image.Transpose.ROTATE_90).save(target)
        count += 1
    print(f"wrote {count} rotated images to {args.output_dir}")


def parse_group(text: str) -> list[int]:
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def judge(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.num_threads)
    pipe = DiffiTPipeline.from_pretrained(args.base)
    if args.transformer:  # e.g. a full fine-tune's checkpoint-<step>/model
        pipe.transformer = type(pipe.transformer).from_pretrained(args.transformer)
    if args.lora:
        pipe.load_lora_weights(args.lora)
    pipe.set_progress_bar_config(disable=True)
    recipe = {k: pipe.config[k] for k in RECIPE_KEYS}
    classes = list(range(pipe.transformer.config.num_classes))
    groups = {g: parse_group(g) for g in args.groups or []}
    train_ink, train_labels, _, _ = digits_split()
    scorer = DigitsJudge(train_ink, train_labels)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        start = time.time()
        ink, labels = sample_digit_ink(pipe, args.per_class, seed, classes=classes, **recipe)
        ink = np.ascontiguousarray(UNDO[args.undo](ink))
        record = {"name": args.name, "base": str(args.base), "seed": seed}
        record |= {k: str(getattr(args, k)) for k in ("transformer", "lora") if getattr(args, k)}
        record.update(scorer(ink, labels))
        for group, members in groups.items():
            keep = np.isin(labels, members)
            record[f"accuracy_{group}"] = scorer(ink[keep], labels[keep])["accuracy"] if keep.any() else None
        record.update(samples=len(labels), undo=args.undo, seconds=round(time.time() - start, 1))
        with open(args.results, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record))


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write the rotated copy of an image folder")
    p.add_argument("image_dir", type=Path)
    p.add_argument("output_dir", type=Path)
    j = sub.add_parser("judge", help="sample a pipeline (+ LoRA) with its saved recipe and score it")
    j.add_argument("--name", required=True, help="the row's name in the results")
    j.add_argument("--base", type=Path, required=True, help="a DiffiT pipeline folder")
    j.add_argument("--lora", type=Path, default=None, help="a folder with pytorch_lora_weights.safetensors")
    j.add_argument("--transformer", type=Path, default=None, help="a transformer folder replacing the base's")
    j.add_argument("--undo", choices=sorted(UNDO), default="none", help="the transform the model was tuned on")
    j.add_argument("--groups", nargs="+", default=None, help="class ranges to score apart, e.g. 0-6 7-9")
    j.add_argument("--per-class", type=int, default=20, help="samples per class and seed (20: 200 per seed)")
    j.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    j.add_argument("--num-threads", type=int, default=1)
    j.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = parser.parse_args(argv)
    {"prepare": prepare, "judge": judge}[args.command](args)


if __name__ == "__main__":
    main()
