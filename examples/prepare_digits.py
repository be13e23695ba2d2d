"""Write the digits training set as an image folder, for the model that ships inside the package
(`embedded_model_path("digits")`) and its U-Net baseline, both trained by `train_diffit.py`:

    python examples/prepare_digits.py data/digits
    accelerate launch examples/train_diffit.py @examples/digits.args --train_data_dir data/digits \
        --output_dir outputs/digits
    # the U-Net baseline: the same command with --architecture unet (and another --output_dir)

`examples/digits.args` holds the shipped model's recipe, one flag per line: EDM (the default objective of image-space
models), AdamW without weight decay, lr 1e-3 with a 200-step linear warm-up, no gradient clipping, batch 64, 3000
steps, labels dropped with probability 0.1, EMA 0.999 with diffusers' warm-up. Run from the repository root.
`--recipe_from` writes the shipped sampling recipe (DPM-Solver++ 2M, 12 steps, guidance 1.25 in
an interval) into the pipeline. The shipped folder is `model_index.json`, `scheduler/` and `transformer/` of the
output (`benchmarks/digits_seeds.sh` trains and scores several seeds of both architectures).

The data and the two model configs are `diffusers_diffit.data.digits`: the 1297 training digits (50 per class held
out for `benchmarks/quality_digits.py`), upsampled to 16×16 and stored as 16-bit grayscale PNGs, so the folder holds
the training images to 1/65535. Needs scikit-learn.
"""

import argparse
from pathlib import Path

from diffusers_diffit.data.digits import RESOLUTION, write_digits_folder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path, help="the image folder to write (one sub-folder per digit)")
    parser.add_argument(
        "--resolution", type=int, default=RESOLUTION, help=f"image side (default {RESOLUTION}; digits-latent: 32)"
    )
    args = parser.parse_args(argv)
    if args.resolution < 8:
        parser.error(f"--resolution must be >= 8 (the digits are 8x8), got {args.resolution}")
    if args.output_dir.exists() and any(args.output_dir.iterdir()):
        parser.error(f"output_dir {str(args.output_dir)!r} is not empty")
    print(f"wrote {write_digits_folder(args.output_dir, args.resolution)} images to {args.output_dir}")


if __name__ == "__main__":
    main()
