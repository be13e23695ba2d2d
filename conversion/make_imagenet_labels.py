"""Generate `diffusers_diffit/data/imagenet_labels.json` (ImageNet-1k class id -> names with synonyms) from timm.

timm ships the ImageNet-1k WordNet synsets in class order and the synset -> lemma table; a class's names are its
lemmas ("tench, Tinca tinca" -> ["tench", "Tinca tinca"]), exactly what `timm.data.ImageNetInfo().
index_to_description(i)` returns. The package reads the JSON and never needs timm. Re-run with:

    pip download --no-deps timm -d /tmp/timm
    python conversion/make_imagenet_labels.py /tmp/timm/timm-*.whl

The JSON checked in was generated from timm 1.0.31.
"""

import argparse
import csv
import json
import zipfile
from pathlib import Path


SYNSETS = "timm/data/_info/imagenet_synsets.txt"
LEMMAS = "timm/data/_info/imagenet_synset_to_lemma.txt"
OUTPUT = Path(__file__).resolve().parents[1] / "diffusers_diffit" / "data" / "imagenet_labels.json"


def read_id2label(wheel: Path) -> dict[str, list[str]]:
    with zipfile.ZipFile(wheel) as archive:
        synsets = archive.read(SYNSETS).decode("utf-8").splitlines()
        lemmas = dict(csv.reader(archive.read(LEMMAS).decode("utf-8").splitlines(), delimiter="\t"))
    if len(synsets) != 1000:
        raise ValueError(f"{SYNSETS} in {wheel} lists {len(synsets)} classes, expected 1000.")
    return {str(i): [name.strip() for name in lemmas[synset].split(",")] for i, synset in enumerate(synsets)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", type=Path, help="a timm wheel (pip download --no-deps timm)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    id2label = read_id2label(args.wheel)
    lines = [f"{json.dumps(i)}: {json.dumps(names, ensure_ascii=False)}" for i, names in id2label.items()]
    args.output.write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")  # one class per line
    print(f"Wrote {len(id2label)} classes to {args.output} (0: {id2label['0']}, 207: {id2label['207']}).")


if __name__ == "__main__":
    main()
