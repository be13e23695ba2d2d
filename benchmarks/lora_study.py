"""LoRA fine-tuning of digits-latent, judged by the digits benchmark (issue 23): a new style and new classes.

    W=outputs/lora-study LATENT=diffusers_diffit/embedded/digits-latent
    python examples/prepare_digits.py $W/images_all --resolution 32       # the shipped model's training digits
    mkdir -p $W/images_0to6 && cp -r $W/images_all/[0-6] $W/images_0to6/
    python -m benchmarks.lora_study prepare $W/images_all $W/images_rot180 --transform rot180  # upside down
    python -m benchmarks.lora_study prepare $W/images_all $W/images_rot90  # every digit rotated by 90°
    for s in all 0to6 rot180 rot90; do python examples/precompute_latents.py --vae $LATENT/vae \
        --train_data_dir $W/images_$s --resolution 32 --output_dir $W/latents_$s; done
    FLAGS="--objective ddpm-hybrid --train_batch_size 64 --learning_rate 1e-3 --lr_scheduler constant_with_warmup \
        --lr_warmup_steps 200 --max_grad_norm 0 --label_dropout 0.1 --report_to none"  # the shipped recipe, no EMA
    LORA="--lora_rank 16 --lora_layers \
        to_q,to_k,to_v,to_out,to_q_time,to_k_time,to_v_time,ff.net.0.proj,ff.net.2,proj_out,linear_1,linear_2"
    # (a) style: the rotated digits, fine-tuned from the shipped model, judged after rotating back (R: rot180, rot90)
    python examples/train_diffit.py $FLAGS $LORA --max_train_steps 2000 --output_dir $W/lora-$R \
        --pretrained_model_name_or_path $LATENT --latents_dir $W/latents_$R
    python examples/train_diffit.py $FLAGS --max_train_steps 2000 --output_dir $W/full-$R \
        --pretrained_model_name_or_path $LATENT --latents_dir $W/latents_$R
    python -m benchmarks.lora_study judge --name lora-$R --base $LATENT --lora $W/lora-$R --undo $R
    python -m benchmarks.lora_study judge --name full-$R --base $W/full-$R --undo $R
    python -m benchmarks.lora_study vae --name vae-$R --vae $LATENT/vae --undo $R  # the ceiling of both
    # (b) new classes: a base on digits 0-6 (the shipped recipe at 6000 steps), extended to 7-9 on all ten
    python examples/train_diffit.py @examples/digits_latent.args --max_train_steps 6000 \
        --latents_dir $W/latents_0to6 --output_dir $W/base-0to6
    python examples/train_diffit.py $FLAGS $LORA --max_train_steps 3000 --output_dir $W/lora-new789 \
        --pretrained_model_name_or_path $W/base-0to6 --latents_dir $W/latents_all
    python -m benchmarks.lora_study judge --name base-0to6 --base $W/base-0to6 --groups 0-6 --per-class 50 \
        --seeds 0 1 2 3 4
    python -m benchmarks.lora_study judge --name lora-new789 --base $W/base-0to6 --lora $W/lora-new789 \
        --groups 0-6 7-9 --per-class 50 --seeds 0 1 2 3 4

`judge` samples each class with the pipeline's saved recipe (scheduler, steps, guidance) from one CPU generator
per seed, maps the images back to 8×8 ink, undoes the transform (a rotation of the 32-px image is the same rotation
of its ink: the bilinear up-sampling is symmetric in both axes) and scores them with the digits judge
(`diffusers_diffit.evaluation.digits`): accuracy over all sampled classes, and accuracy per group of classes
(`--groups 0-6 7-9`). One JSON line per seed goes to `benchmarks/results/lora_digits_latent.jsonl`. `vae` scores
the training digits themselves through the transform, the VAE (encoded and decoded) and the undo: a fine-tune of the
transformer alone cannot beat what its training latents decode to. Measured results: docs/digits-benchmarks.md.
"""

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from diffusers_diffit import DiffiTPipeline
from diffusers_diffit.data.digits import digits_split, ink_to_model, model_to_ink
from diffusers_diffit.evaluation.digits import DigitsJudge, sample_digit_ink
from diffusers_diffit.pipelines import RECIPE_KEYS


logger = logging.getLogger(__name__)
DEFAULT_RESULTS = Path(__file__).parent / "results" / "lora_digits_latent.jsonl"
# Counter-clockwise quarter turns of each transform: on ink [N, 8, 8] (np.rot90) and on images (`prepare`).
QUARTER_TURNS = {"none": 0, "rot90": 1, "rot180": 2}
PIL_ROTATION = {1: Image.Transpose.ROTATE_90, 2: Image.Transpose.ROTATE_180}


def do(transform: str, ink: np.ndarray) -> np.ndarray:
    return np.rot90(ink, k=QUARTER_TURNS[transform], axes=(1, 2))


def undo(transform: str, ink: np.ndarray) -> np.ndarray:
    return np.rot90(ink, k=-QUARTER_TURNS[transform], axes=(1, 2))


def prepare(args: argparse.Namespace) -> None:
    """Copy an image folder (one sub-folder per class) with every image rotated counter-clockwise."""
    if args.output_dir.exists() and any(args.output_dir.iterdir()):
        raise ValueError(f"`output_dir` {str(args.output_dir)!r} is not empty.")
    count = 0
    for path in sorted(args.image_dir.glob("*/*.png")):
        target = args.output_dir / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            image.transpose(PIL_ROTATION[QUARTER_TURNS[args.transform]]).save(target)
        count += 1
    print(f"wrote {count} images rotated by {args.transform} to {args.output_dir}")


def write_record(record: dict, results: Path) -> None:
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))


def vae_round_trip(args: argparse.Namespace) -> None:
    """Score the training digits after the transform, the VAE's round trip (posterior mean) and the undo: what a
    transformer that reproduced the training latents exactly would score, the ceiling of a fine-tune on them."""
    torch.set_num_threads(args.num_threads)
    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    train_ink, train_labels, _, _ = digits_split()
    images = ink_to_model(np.ascontiguousarray(do(args.undo, train_ink)), vae.config.sample_size)
    with torch.no_grad():
        decoded = vae.decode(vae.encode(images).latent_dist.mean).sample
    ink = np.ascontiguousarray(undo(args.undo, model_to_ink(decoded)))
    record = {"name": args.name, "vae": str(args.vae)} | DigitsJudge(train_ink, train_labels)(ink, train_labels)
    write_record(record | {"samples": len(ink), "undo": args.undo}, args.results)


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
    for seed in args.seeds:
        start = time.time()
        ink, labels = sample_digit_ink(pipe, args.per_class, seed, classes=classes, **recipe)
        ink = np.ascontiguousarray(undo(args.undo, ink))
        record = {"name": args.name, "base": str(args.base), "seed": seed}
        record |= {k: str(getattr(args, k)) for k in ("transformer", "lora") if getattr(args, k)}
        record.update(scorer(ink, labels))
        for group, members in groups.items():
            keep = np.isin(labels, members)
            record[f"accuracy_{group}"] = scorer(ink[keep], labels[keep])["accuracy"] if keep.any() else None
        record.update(samples=len(labels), undo=args.undo, seconds=round(time.time() - start, 1))
        write_record(record, args.results)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write a rotated copy of an image folder")
    p.add_argument("image_dir", type=Path)
    p.add_argument("output_dir", type=Path)
    p.add_argument("--transform", choices=["rot90", "rot180"], default="rot90", help="the counter-clockwise rotation")
    j = sub.add_parser("judge", help="sample a pipeline (+ LoRA) with its saved recipe and score it")
    j.add_argument("--name", required=True, help="the row's name in the results")
    j.add_argument("--base", type=Path, required=True, help="a DiffiT pipeline folder")
    j.add_argument("--lora", type=Path, default=None, help="a folder with pytorch_lora_weights.safetensors")
    j.add_argument("--transformer", type=Path, default=None, help="a transformer folder replacing the base's")
    j.add_argument(
        "--undo", choices=sorted(QUARTER_TURNS), default="none", help="the transform the model was tuned on"
    )
    j.add_argument("--groups", nargs="+", default=None, help="class ranges to score apart, e.g. 0-6 7-9")
    j.add_argument("--per-class", type=int, default=20, help="samples per class and seed (20: 200 per seed)")
    j.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    j.add_argument("--num-threads", type=int, default=1)
    j.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    v = sub.add_parser("vae", help="score the training digits through the transform, a VAE's round trip and the undo")
    v.add_argument("--name", required=True, help="the row's name in the results")
    v.add_argument("--vae", type=Path, required=True, help="an AutoencoderKL folder")
    v.add_argument("--undo", choices=sorted(QUARTER_TURNS), default="none", help="the transform to apply, then undo")
    v.add_argument("--num-threads", type=int, default=1)
    v.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = parser.parse_args(argv)
    {"prepare": prepare, "judge": judge, "vae": vae_round_trip}[args.command](args)


if __name__ == "__main__":
    main()
