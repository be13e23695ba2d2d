"""ImageNet names shipped with the package, name lookup, and `id2label` normalisation."""

import json
from importlib.resources import files

import pytest

from diffusers_diffit.labels import imagenet_id2label, lookup_label_ids, normalize_id2label


def test_imagenet_file_has_the_1000_classes_in_order():
    raw = json.loads(files("diffusers_diffit").joinpath("data", "imagenet_labels.json").read_text("utf-8"))
    assert list(raw) == [str(i) for i in range(1000)]
    labels = imagenet_id2label()
    # facts of ImageNet-1k's class order (timm's ImageNetInfo().index_to_description(i))
    assert ", ".join(labels[0]) == "tench, Tinca tinca"
    assert labels[207] == ["golden retriever"]
    assert labels[1] == ["goldfish", "Carassius auratus"]
    assert labels[999] == ["toilet tissue", "toilet paper", "bathroom tissue"]
    assert all(names and all(n == n.strip() and n for n in names) for names in labels.values())


def test_imagenet_id2label_returns_a_fresh_dict():
    labels = imagenet_id2label()
    labels[207].append("good boy")
    assert imagenet_id2label()[207] == ["golden retriever"]


@pytest.mark.parametrize(
    "query, expected",
    [
        ("golden retriever", [207]),
        ("Golden Retriever", [207]),
        ("  golden retriever ", [207]),
        ("Tinca tinca", [0]),  # a synonym
        ("tench, Tinca tinca", [0]),  # the full description
        ("white shark", [2]),
        (["tench", "golden retriever", "tench"], [0, 207, 0]),
        ([], []),
    ],
)
def test_lookup_is_case_insensitive_over_synonyms(query, expected):
    assert lookup_label_ids(query, imagenet_id2label()) == expected


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ValueError, match=r"Unknown class label 'golden retreiver'.*'golden retriever' \(207\)"):
        lookup_label_ids("golden retreiver", imagenet_id2label())
    with pytest.raises(ValueError, match="No close match"):
        lookup_label_ids("qqqqzzzz", imagenet_id2label())


def test_name_shared_by_two_classes_is_refused():
    # "crane" is both the bird (134) and the machine (517)
    with pytest.raises(ValueError, match=r"'crane' names several classes \(134: 'crane'; 517: 'crane'\)"):
        lookup_label_ids("crane", imagenet_id2label())


@pytest.mark.parametrize("bad", [207, ["tench", 3], None])
def test_lookup_takes_only_strings(bad):
    with pytest.raises(ValueError, match="`labels` must be a string or a list of strings"):
        lookup_label_ids(bad, imagenet_id2label())


def test_normalize_accepts_json_keys_and_dit_strings():
    assert normalize_id2label({"1": "b, bee", 0: ["a"]}) == {0: ["a"], 1: ["b", "bee"]}
    assert list(normalize_id2label({"10": ["x"], "2": ["y"]})) == [2, 10]  # numeric order, not string order


@pytest.mark.parametrize(
    "id2label, num_classes, match",
    [
        ([["a"]], None, "must be a mapping"),
        ({"x": ["a"]}, None, "keys must be class ids"),
        ({True: ["a"]}, None, "keys must be class ids"),
        ({-1: ["a"]}, None, "keys must be class ids"),
        ({3: ["a"]}, 3, r"class id 3, outside \[0, 3\)"),
        ({0: [1]}, None, r"must be a string or a list of strings"),
        ({0: " , "}, None, "has no name"),
        ({0: ["a"], "0": ["b"]}, None, "lists class id 0 twice"),
    ],
)
def test_normalize_rejects_bad_maps(id2label, num_classes, match):
    with pytest.raises(ValueError, match=match):
        normalize_id2label(id2label, num_classes=num_classes)
