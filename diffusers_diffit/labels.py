"""Class names of class-conditional models: `id2label` (class id -> names with synonyms) and the reverse lookup.

ImageNet-1k's names ship with the package (`data/imagenet_labels.json`, generated from timm's WordNet tables by
`conversion/make_imagenet_labels.py`): 0 -> ["tench", "Tinca tinca"], 207 -> ["golden retriever"].
"""

import difflib
import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib.resources import files


@lru_cache(maxsize=1)
def _imagenet_labels_json() -> str:
    return files("diffusers_diffit").joinpath("data", "imagenet_labels.json").read_text(encoding="utf-8")


def imagenet_id2label() -> dict[int, list[str]]:
    """ImageNet-1k class id -> its names (a fresh dict each call)."""
    return normalize_id2label(json.loads(_imagenet_labels_json()))


def normalize_id2label(id2label: Mapping, num_classes: int | None = None) -> dict[int, list[str]]:
    """Ids as ints or digit strings (JSON keys), names as a list of strings or one comma-separated string (the
    format of diffusers' DiT pipelines) -> {int id: [name, ...]}, sorted by id. With `num_classes`, ids must lie in
    [0, num_classes)."""
    if not isinstance(id2label, Mapping):
        raise ValueError(f"`id2label` must be a mapping of class id -> names, got {type(id2label).__name__}.")
    normalized = {}
    for key, names in id2label.items():
        if isinstance(key, bool) or not (
            (isinstance(key, int) and key >= 0) or (isinstance(key, str) and key.isdigit())
        ):
            raise ValueError(f"`id2label` keys must be class ids (int >= 0 or digit string), got {key!r}.")
        class_id = int(key)
        if num_classes is not None and not 0 <= class_id < num_classes:
            raise ValueError(f"`id2label` has class id {class_id}, outside [0, {num_classes}) of this model.")
        if isinstance(names, str):
            names = names.split(",")
        if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"`id2label[{key!r}]` must be a string or a list of strings, got {names!r}.")
        names = [n.strip() for n in names if n.strip()]
        if not names:
            raise ValueError(f"`id2label[{key!r}]` has no name.")
        if class_id in normalized:
            raise ValueError(f"`id2label` lists class id {class_id} twice.")
        normalized[class_id] = names
    return dict(sorted(normalized.items()))


def _description(names: list[str]) -> str:
    return ", ".join(names)


def label_index(id2label: Mapping[int, list[str]]) -> dict[str, set[int]]:
    """Lower-cased name -> the ids of the classes it names: every synonym, and each class's full description
    ("tench, tinca tinca"). The one matching rule of names to classes."""
    index: dict[str, set[int]] = {}
    for class_id, names in id2label.items():
        for name in (*names, _description(names)):
            index.setdefault(name.lower(), set()).add(class_id)
    return index


def lookup_label_ids(labels: str | Sequence[str], id2label: Mapping[int, list[str]]) -> list[int]:
    """Class ids of names: a case-insensitive exact match on any synonym or on the full description
    ("tench, Tinca tinca"). Unknown names raise `ValueError` with the closest matches; names shared by several
    classes ("crane": the bird and the machine) raise `ValueError` listing them."""
    if isinstance(labels, str):
        labels = [labels]
    elif not isinstance(labels, Sequence) or not all(isinstance(label, str) for label in labels):
        raise ValueError(f"`labels` must be a string or a list of strings, got {labels!r}.")
    index = label_index(id2label)
    spelling: dict[str, str] = {}  # lower-cased name -> as first written
    for names in id2label.values():
        for name in (*names, _description(names)):
            spelling.setdefault(name.lower(), name)

    ids = []
    for label in labels:
        matches = sorted(index.get(label.strip().lower(), ()))
        if len(matches) == 1:
            ids.append(matches[0])
            continue
        if matches:
            options = "; ".join(f"{i}: {_description(id2label[i])!r}" for i in matches)
            raise ValueError(f"Class label {label!r} names several classes ({options}); pass the class id instead.")
        close = difflib.get_close_matches(label.strip().lower(), index, n=5, cutoff=0.6)
        hint = ", ".join(f"{spelling[name]!r} ({', '.join(map(str, sorted(index[name])))})" for name in close)
        raise ValueError(
            f"Unknown class label {label!r}. " + (f"Closest matches: {hint}." if hint else "No close match.")
        )
    return ids
