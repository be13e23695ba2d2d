"""Training data (diffusers_diffit/data): image folders with seeded augmentation, 16-bit images, cached latents
(examples/precompute_latents.py), accelerate's seeded data order, and the digits folder of the shipped model."""

import io
import json

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from diffusers_diffit.data import ImageDataset, LatentDataset, preprocess_image
from diffusers_diffit.data.digits import digits_split, ink_to_model, model_to_ink, write_digits_folder
from diffusers_diffit.seeding import derive_seed
from tests.utils import load_example, reset_accelerate, run_in_process, write_image_folder


precompute_latents = load_example("precompute_latents")


def views(data, index: int, epochs=range(12)) -> list[torch.Tensor]:
    out = []
    for epoch in epochs:
        data.set_epoch(epoch)
        out.append(data[index]["pixel_values" if isinstance(data, ImageDataset) else "moments"])
    return out


def test_image_dataset_from_folder_labels_and_seeded_augmentation(train_assets, tmp_path):
    data = ImageDataset.from_folder(train_assets["rgb"], 16, random_flip=True, seed=3)
    assert data.classes == ["cat", "dog", "fish"] and data.labels == [0] * 4 + [1] * 4 + [2] * 4
    item = data[5]
    assert item["pixel_values"].shape == (3, 16, 16) and item["class_labels"] == 1
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    # an item is a pure function of (seed, epoch, index): the same again, and again in a fresh dataset
    again = ImageDataset.from_folder(train_assets["rgb"], 16, random_flip=True, seed=3)
    first, second = views(data, 5), views(again, 5)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert len({v.sum().item() for v in first}) > 1  # random crops / flips vary with the epoch
    other_seed = views(ImageDataset.from_folder(train_assets["rgb"], 16, random_flip=True, seed=4), 5)
    assert any(not torch.equal(a, b) for a, b in zip(first, other_seed))

    plain = ImageDataset.from_folder(train_assets["rgb"], 16, center_crop=True)  # no randomness at all
    centred = preprocess_image(Image.open(train_assets["rgb"] / "dog" / "1.png"), 16)
    assert all(torch.equal(v, centred) for v in views(plain, 5, range(3)))

    gray = ImageDataset.from_folder(train_assets["gray"], 8, channels=1)
    assert gray[0]["pixel_values"].shape == (1, 8, 8)
    flat = write_image_folder(tmp_path / "flat", ["x"], 2) / "x"
    assert ImageDataset.from_folder(flat, 8).classes is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        ImageDataset.from_folder(tmp_path / "empty", 8)
    with pytest.raises(ValueError, match="channels"):
        preprocess_image(Image.open(train_assets["rgb"] / "dog" / "1.png"), 8, channels=2)


def test_accelerate_seedable_sampler_order_depends_only_on_seed_and_epoch():
    """The data order train_diffit.py relies on for exact resumes: accelerate's seedable sampler."""

    def order(seed: int, epoch: int) -> list[int]:
        reset_accelerate()
        accelerator = Accelerator(
            cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed)
        )
        loader = accelerator.prepare(DataLoader(list(range(20)), batch_size=4, shuffle=True, drop_last=True))
        loader.set_epoch(epoch)
        result = [i for batch in loader for i in batch.tolist()]
        reset_accelerate()
        return result

    first = order(0, 1)
    assert sorted(first) == list(range(20)) and order(0, 1) == first
    assert order(0, 2) != first and order(7, 1) != first


def test_preprocess_image_resizes_short_side_and_centre_crops():
    pixels = np.zeros((40, 80), dtype=np.uint8)
    pixels[:, 30:50] = 255  # a white band in the middle of a wide image
    out = preprocess_image(Image.fromarray(pixels), 10, channels=1)
    assert out.shape == (1, 10, 10)
    assert out[0, :, 5].min() > 0.9 and out[0, :, 0].max() < -0.9  # centre kept, sides cropped away


def test_sixteen_bit_grayscale_keeps_its_precision():
    levels = np.array([[0, 1, 32768, 65535]], dtype=np.uint16).repeat(4, 0)
    out = preprocess_image(Image.fromarray(levels), 4, channels=1)
    expected = torch.from_numpy(levels.astype(np.float64) / 65535 * 2 - 1).float()
    torch.testing.assert_close(out[0], expected, rtol=0, atol=1e-7)
    assert out[0, 0, 1] > -1  # one 16-bit level above black is not rounded away (8 bits would be)


def test_digits_folder_holds_the_training_images(tmp_path):
    """The folder train_diffit.py trains the shipped model from: the upsampled training digits to 1/65535."""
    assert write_digits_folder(tmp_path) == 1297
    data = ImageDataset.from_folder(tmp_path, 16, channels=1, center_crop=True)
    assert data.classes == [str(d) for d in range(10)]
    images = torch.stack([data[i]["pixel_values"] for i in range(len(data))])
    ink, labels, held_ink, _ = digits_split()
    order = np.argsort(labels, kind="stable")  # the folder lists class by class
    assert data.labels == labels[order].tolist()
    assert (images - ink_to_model(ink)[order]).abs().max() <= 0.5 / 65535 * 2 + 1e-7
    np.testing.assert_allclose(model_to_ink(ink_to_model(held_ink)), held_ink, atol=1e-5)  # the inverse map


def test_precompute_latents_stores_vae_moments_and_resumes(train_assets, tmp_path):
    out = tmp_path / "latents"
    argv = [
        "--vae",
        train_assets["vae"],
        "--train_data_dir",
        train_assets["rgb"],
        "--resolution",
        16,
        "--flip",
        "--output_dir",
        out,
        "--shard_size",
        5,
        "--batch_size",
        3,
    ]
    run_in_process(precompute_latents, argv)
    data = LatentDataset(out, random_flip=True)
    assert len(data) == 12 and data.classes == ["cat", "dog", "fish"] and len(data.shards) == 3

    vae = AutoencoderKL.from_pretrained(train_assets["vae"])
    images = ImageDataset.from_folder(train_assets["rgb"], 16, center_crop=True)
    with torch.no_grad():
        pixels = images[7]["pixel_values"][None]
        expected = vae.encode(pixels).latent_dist.parameters[0]
        expected_flipped = vae.encode(pixels.flip(-1)).latent_dist.parameters[0]
    seen = views(data, 7, range(16))
    torch.testing.assert_close(LatentDataset(out)[7]["moments"], expected, rtol=1e-5, atol=1e-5)
    assert LatentDataset(out)[7]["class_labels"] == 1 and len({tuple(m.flatten()[:3].tolist()) for m in seen}) == 2
    assert any(torch.allclose(m, expected_flipped, rtol=1e-5, atol=1e-5) for m in seen)

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    run_in_process(precompute_latents, argv)  # finished shards are skipped
    assert {p: p.stat().st_mtime_ns for p in out.glob("shard-*")} == stamps
    with pytest.raises(ValueError, match="other settings"):
        run_in_process(precompute_latents, argv[:-4] + ["--shard_size", 5, "--batch_size", 3, "--dtype", "float16"])
    no_flip = tmp_path / "no-flip"
    run_in_process(
        precompute_latents,
        [
            "--vae",
            train_assets["vae"],
            "--train_data_dir",
            train_assets["gray"],
            "--resolution",
            16,
            "--output_dir",
            no_flip,
        ],
    )
    with pytest.raises(ValueError, match="without --flip"):
        LatentDataset(no_flip, random_flip=True)


def test_derive_seed_is_a_pure_function_of_its_keys():
    assert derive_seed(0, 5, 1, 0) == derive_seed(0, 5, 1, 0) < 2**63
    assert len({derive_seed(0, s, m, p) for s in range(20) for m in range(3) for p in range(2)}) == 120
    assert derive_seed(1, 0) != derive_seed(0, 1)  # the order of the keys matters
    with pytest.raises(ValueError, match="non-negative"):
        derive_seed(0, -1)


def test_bad_images_stop_the_scan_with_their_path_or_are_skipped_and_counted(tmp_path, caplog):
    data = write_image_folder(tmp_path / "data", ["a", "b"], per_class=3)
    good = (data / "a" / "0.png").read_bytes()
    (data / "a" / "empty.png").write_bytes(b"")
    (data / "a" / "cut.png").write_bytes(good[: len(good) // 2])  # truncated: a PNG chunk fails its checksum
    (data / "b" / "text.jpg").write_text("not an image")
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(buffer, "JPEG")
    (data / "b" / "cut.jpg").write_bytes(buffer.getvalue()[:-200])  # truncated JPEG: no end marker, no decode
    Image.fromarray(np.zeros((4, 4), np.int32)).save(data / "b" / "int32.tif")  # mode "I": no known range
    (data / "b" / "._0.png").write_bytes(b"\0\5\26\7")  # macOS metadata: hidden, not an image of the dataset
    for name, reason in [
        ("cut.png", "not a readable image"),
        ("empty.png", "is empty"),
        ("cut.jpg", "not a readable image"),
        ("int32.tif", "mode 'I'"),
        ("text.jpg", "not a readable image"),
    ]:
        with pytest.raises(ValueError, match=f"{name}.*{reason}.*--on_bad_image skip"):
            ImageDataset.from_folder(data, 8)
        path = next(data.rglob(name))
        path.rename(path.with_name(path.name + ".bad"))  # the scan stops at the first bad file, in sorted order
    for path in data.rglob("*.bad"):
        path.rename(path.with_suffix(""))

    with caplog.at_level("WARNING", logger="diffusers_diffit.data.datasets"):
        dataset = ImageDataset.from_folder(data, 8, on_bad_image="skip")
    assert len(dataset) == 6 and dataset.labels == [0] * 3 + [1] * 3
    assert "Skipped 5 of 11 images" in caplog.text and caplog.text.count("Skipping") == 5
    with pytest.raises(ValueError, match="on_bad_image"):
        ImageDataset.from_folder(data, 8, on_bad_image="ignore")

    for path in (data / "b").glob("[0-9].png"):
        path.unlink()  # class "b" is left with bad files only
    with pytest.raises(ValueError, match=r"class folder\(s\) \['.*b'\] hold no usable images"):
        ImageDataset.from_folder(data, 8, on_bad_image="skip")
    kept = ImageDataset.from_folder(data, 8, on_bad_image="skip", allow_empty_classes=True)
    assert kept.classes == ["a", "b"] and kept.labels == [0] * 3
    (data / "c").mkdir()  # an empty class folder is refused by default, naming it
    with pytest.raises(ValueError, match=r"\['.*c'\] hold no usable images"):
        ImageDataset.from_folder(data, 8, on_bad_image="skip", allow_empty_classes=False)
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    (nothing / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no usable images"):
        ImageDataset.from_folder(nothing, 8, on_bad_image="skip")


def test_unusual_modes_convert_to_the_model_channels(tmp_path):
    """Against values computed by hand: alpha composited on white, palette looked up, 1-bit to 0/255, CMYK by
    PIL's formula, 16-bit kept at full precision (also for an RGB model); images smaller than the size upscaled."""
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128  # red 200 at half opacity over white: 200·a + 255·(1 − a)
    a = 128 / 255
    out = preprocess_image(Image.fromarray(rgba, "RGBA"), 4)
    expected = torch.tensor([200 * a + 255 * (1 - a), 255 * (1 - a), 255 * (1 - a)]) / 127.5 - 1
    torch.testing.assert_close(out[:, 0, 0], expected, atol=1.5 / 127.5, rtol=0)  # PIL rounds each step

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    torch.testing.assert_close(preprocess_image(palette, 4)[:, 0, 0], torch.tensor([10.0, 20, 30]) / 127.5 - 1)
    transparent = palette.copy()
    transparent.info["transparency"] = 1  # the palette's transparent colour: white after compositing
    assert torch.equal(preprocess_image(transparent, 4), torch.ones(3, 4, 4))

    one_bit = Image.fromarray(np.array([[0, 1] * 2] * 4, bool))
    assert preprocess_image(one_bit, 4, channels=1)[0, 0].tolist() == [-1.0, 1.0, -1.0, 1.0]
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 0, 0))  # full magenta ink: RGB (255, 0, 255)
    assert preprocess_image(cmyk, 4)[:, 0, 0].tolist() == [1.0, -1.0, 1.0]

    levels = np.array([[0, 1, 32768, 65535]], dtype=np.uint16).repeat(4, 0)
    rgb = preprocess_image(Image.fromarray(levels), 4, channels=3)
    torch.testing.assert_close(rgb, preprocess_image(Image.fromarray(levels), 4, channels=1).expand(3, -1, -1))
    assert rgb[0, 0, 1] > -1 and rgb[0, 0, 3] == 1  # not clipped to 8 bits

    small = preprocess_image(Image.new("L", (3, 5), 77), 8, channels=1)  # upscaled
    assert small.shape == (1, 8, 8) and torch.allclose(small, torch.full_like(small, 77 / 127.5 - 1), atol=1e-5)


def test_cached_latents_with_nan_or_inf_are_refused_naming_the_shard(tmp_path):
    root = tmp_path / "latents"
    root.mkdir()
    moments = torch.zeros(3, 8, 2, 2)
    moments[2, 0, 1, 1] = float("nan")
    save_file({"moments": moments, "labels": torch.zeros(3, dtype=torch.long)}, str(root / "shard-00001.safetensors"))
    save_file({"moments": torch.zeros(3, 8, 2, 2), "labels": torch.zeros(3, dtype=torch.long)}, str(root / "s0.st"))
    metadata = {"flip": False, "classes": None, "shard_size": 3, "num_items": 6}
    (root / "metadata.json").write_text(json.dumps({**metadata, "shards": ["s0.st", "shard-00001.safetensors"]}))
    with pytest.raises(
        ValueError, match=r"shard-00001.safetensors' holds non-finite 'moments' .* 1 of 3 items, the first item 5"
    ):
        LatentDataset(root)
    (root / "shard-00001.safetensors").write_bytes(b"12345678")  # damaged
    with pytest.raises(ValueError, match="shard-00001.safetensors' cannot be read"):
        LatentDataset(root)
