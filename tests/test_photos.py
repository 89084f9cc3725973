"""Photo folders (any size, mode, orientation) and the uint8 image store that every process maps.

Expected pixels come from PIL/numpy directly or from images drawn so the answer is known by
construction (colour bands, a 16-bit grey of a known value), never from workbench's decoder.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from workbench.config import DataConfig
from workbench.data import load_data
from workbench.data import photos as photos_module
from workbench.errors import DataError

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def bands(width: int = 100, height: int = 20) -> Image.Image:
    """Red | green | blue vertical bands: 30 %, 40 %, 30 % of the width."""
    a = np.zeros((height, width, 3), np.uint8)
    a[:, : width * 3 // 10] = RED
    a[:, width * 3 // 10 : width * 7 // 10] = GREEN
    a[:, width * 7 // 10 :] = BLUE
    return Image.fromarray(a)


def save(img: Image.Image, path: Path, **kw: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def folder_data(root: Path, **data: object) -> object:
    return load_data(DataConfig(source="folder", **data), str(root))


def test_center_crop_keeps_the_centre_and_stretch_keeps_everything(tmp_path: Path) -> None:
    save(bands(), tmp_path / "a" / "wide.png")
    save(bands().transpose(Image.Transpose.ROTATE_90), tmp_path / "b" / "tall.png")
    crop = folder_data(tmp_path, image_size=10)
    # 100x20 covered at scale 1/2: the kept region is x = 40..60 of the source, all green
    wide = crop.pixels[0].numpy().transpose(1, 2, 0)
    assert crop.pixels.shape == (2, 3, 10, 10) and (wide == GREEN).all()
    stretch = folder_data(tmp_path, image_size=[10, 10], resize_policy="stretch")
    wide = stretch.pixels[0].numpy().transpose(1, 2, 0)
    assert (wide[:, 0] == RED).all() and (wide[:, -1] == BLUE).all()
    assert crop.preprocess["resize_policy"] == "center_crop"
    assert stretch.preprocess == {
        "image_size": [10, 10],
        "resize_policy": "stretch",
        "channels": 3,
        "scale": 255.0,
    }


def test_center_crop_of_squares_and_near_squares(tmp_path: Path) -> None:
    # 49 x 49 to 64: the covering scale's float rounding once put the box at -3.6e-15
    sizes = [(49, 49), (49, 51), (97, 96), (300, 300), (320, 97)]
    for i, size in enumerate(sizes):
        save(Image.new("RGB", size, (10 * i, 100, 200)), tmp_path / "ab"[i % 2] / f"{i}.png")
    d = folder_data(tmp_path, image_size=64)
    assert d.pixels.shape == (5, 3, 64, 64) and not d.skipped
    colours = {tuple(int(v) for v in d.pixels[k, :, 32, 32]) for k in range(5)}
    assert colours == {(10 * i, 100, 200) for i in range(5)}


def test_any_mode_becomes_rgb_or_grey(tmp_path: Path) -> None:
    grey16 = np.full((6, 6), 32896, np.uint16)  # 32896 / 257 = 128 exactly
    save(Image.fromarray(grey16), tmp_path / "grey" / "wide.png")
    save(Image.new("1", (6, 6), 1), tmp_path / "grey" / "bilevel.png")
    assert Image.open(tmp_path / "grey" / "wide.png").mode.startswith("I")
    save(Image.new("L", (6, 6), 77), tmp_path / "other" / "l.png")
    grey = folder_data(tmp_path)
    assert grey.pixels.shape == (3, 1, 6, 6)  # every file grey: one channel
    bilevel, wide, l8 = grey.pixels.numpy()  # sorted by class folder, then file name
    assert (bilevel == 255).all() and (wide == 128).all() and (l8 == 77).all()
    rgba = Image.new("RGBA", (6, 6), (10, 20, 30, 0))
    save(rgba, tmp_path / "other" / "rgba.png")
    palette = Image.new("RGB", (6, 6), (200, 100, 50)).convert("P", palette=Image.Palette.ADAPTIVE)
    save(palette, tmp_path / "other" / "palette.png")
    save(Image.new("CMYK", (6, 6), (0, 0, 0, 0)), tmp_path / "other" / "cmyk.jpg", quality=100)
    colour = folder_data(tmp_path)
    px = colour.pixels.numpy().transpose(0, 2, 3, 1)  # (N, H, W, 3)
    assert colour.pixels.shape == (6, 3, 6, 6)  # any colour file: RGB, greys repeated
    files = ["bilevel", "wide", "cmyk", "l", "palette", "rgba"]  # sorted by class, then name
    by = dict(zip(files, px, strict=True))
    assert (by["wide"] == 128).all() and (by["l"] == 77).all()
    assert (by["rgba"] == (10, 20, 30)).all()  # alpha dropped, as torchvision's loader does
    assert (by["palette"] == np.asarray(palette.convert("RGB"))).all()
    assert (np.abs(by["cmyk"].astype(int) - 255) <= 2).all()  # CMYK 0,0,0,0 is white


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    a = np.zeros((8, 16, 3), np.uint8)  # 16 wide, 8 high: left half white
    a[:, :8] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    save(Image.fromarray(a), tmp_path / "a" / "rotated.jpg", exif=exif, quality=95)
    save(Image.new("RGB", (8, 16)), tmp_path / "b" / "upright.png")  # 8 wide, 16 high
    d = folder_data(tmp_path)  # no image_size: both are 16 high x 8 wide once rotated
    img = d.pixels[0].numpy().mean(axis=0)  # (16, 8)
    assert img.shape == (16, 8)
    assert img[:6].mean() > 240 and img[10:].mean() < 15  # the white half is now on top


def test_bad_file_is_an_error_or_skipped_and_listed(tmp_path: Path) -> None:
    for i in range(3):
        save(Image.new("L", (4, 4), 10 * i), tmp_path / "a" / f"{i}.png")
        save(Image.new("L", (4, 4), 100), tmp_path / "b" / f"{i}.png")
    bad = tmp_path / "a" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=rf"{re.escape(str(bad))}.*on_bad_file = \"skip\""):
        folder_data(tmp_path)
    d = folder_data(tmp_path, on_bad_file="skip")
    assert len(d.y) == 6 and d.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert len(d.skipped) == 1 and d.skipped[0].startswith(f"{bad}: cannot be decoded")


def test_many_files_decode_in_parallel_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for c in ("a", "b"):
        for i in range(150):  # 300 files: above the size where decoding processes start
            a = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
            arrays[save(Image.fromarray(a), tmp_path / c / f"{i:03d}.png")] = a
    d = folder_data(tmp_path)
    expected = np.stack([arrays[f] for f in sorted(arrays)]).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(d.pixels.numpy(), expected)


def test_store_is_written_once_reused_and_rebuilt_when_the_source_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, store = tmp_path / "photos", tmp_path / "images"
    for c in ("cat", "dog"):
        for i in range(3):
            save(Image.new("RGB", (9, 6), (i * 40, 0, 200)), src / c / f"{i}.jpg")
    cfg = DataConfig(source="folder", image_size=4)
    first = load_data(cfg, str(src), store)
    (npy,) = store.glob("*.npy")
    assert np.load(npy).shape == (6, 3, 4, 4)
    np.testing.assert_array_equal(np.load(npy), first.pixels.numpy())

    def no_decoding(*args: object) -> None:
        raise AssertionError("the store exists: nothing may be decoded")

    monkeypatch.setattr(photos_module, "decode", no_decoding)
    again = load_data(cfg, str(src), store)
    assert again.fingerprint == first.fingerprint and again.classes == ("cat", "dog")
    assert not again.pixels.numpy().flags.owndata  # a view of the mapped file, not a copy
    monkeypatch.undo()

    changed = src / "dog" / "0.jpg"
    save(Image.new("RGB", (9, 6), (255, 255, 255)), changed)
    os.utime(changed, ns=(1, 1))  # a different modification time, whatever the clock
    rebuilt = load_data(cfg, str(src), store)
    assert rebuilt.fingerprint != first.fingerprint
    assert len(list(store.glob("*.npy"))) == 1 and len(list(store.glob("*.json"))) == 1
    assert not list(store.glob(".*"))  # no temporary files left behind


def mapped_kb(npy: Path) -> int:
    """Resident kB of this process's mappings of `npy`, from /proc/self/smaps."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = len(head) > 5 and head[5] == str(npy.resolve())
        elif inside and head[0] == "Rss:":
            total += int(head[1])
    return total


def test_a_pass_over_scattered_rows_of_a_store_does_not_map_the_whole_store(
    tmp_path: Path,
) -> None:
    # each page fault maps the 64 KB around it, so reading every 5th row of the store would map
    # all of it; a pass lets go of each chunk's pages once it is gathered
    rng = np.random.default_rng(0)
    for i in range(3000):
        a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        save(Image.fromarray(a), tmp_path / "photos" / "ab"[i % 2] / f"{i:04d}.png")
    d = load_data(DataConfig(source="folder"), str(tmp_path / "photos"), tmp_path / "images")
    (npy,) = (tmp_path / "images").glob("*.npy")
    assert npy.stat().st_size > 9_000_000  # 3,000 rows of 3 KB
    rows = np.arange(0, 3000, 5)
    expected = np.load(npy)[rows].astype(np.float32) / 255  # read without the store's map
    got = np.concatenate([b.numpy() for b in d.rows(rows).chunks(100)])
    np.testing.assert_array_equal(got, expected)
    assert mapped_kb(npy) < 256  # at most the 64 KB around a chunk's ends
    unreleased = dataclasses.replace(d.rows(rows), pages=None)  # the control
    np.testing.assert_array_equal(np.concatenate([b.numpy() for b in unreleased.chunks(100)]), got)
    assert mapped_kb(npy) > 8_000  # about every page of the file


def test_image_size_is_checked_when_the_study_is_loaded() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"an int \(a square\) or \[height, width\]"):
        DataConfig(source="folder", image_size=0)
    with pytest.raises(ValidationError, match=r"image_size` applies to data\.source = 'folder'"):
        DataConfig(source="idx", image_size=32)
    assert DataConfig(source="folder", image_size=[24, 32]).size == (24, 32)


ROOT = Path(__file__).resolve().parents[1]


def test_shipped_photo_and_cifar10_studies_read_data_made_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pickle

    import torchvision.datasets.cifar as cifar

    from workbench.config import load_study

    photos = load_study(ROOT / "studies" / "photos.toml")
    for i, (w, h) in enumerate([(120, 80), (64, 200), (300, 300), (97, 101)]):
        save(bands(w, h), tmp_path / "photos" / ("cat" if i % 2 else "dog") / f"{i}.jpg")
    (tmp_path / "photos" / "cat" / "bad.png").write_bytes(b"not a png")  # on_bad_file = skip
    d = load_data(photos.data, str(tmp_path / "photos"))
    assert d.pixels.shape == (4, 3, 96, 96) and d.classes == ("cat", "dog")
    assert len(d.skipped) == 1 and "bad.png" in d.skipped[0]

    cfg = load_study(ROOT / "studies" / "cifar10.toml")
    batches = tmp_path / "cifar" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    rows = {}
    for name in names:  # the CIFAR-10 python format: (n, 3072) uint8 rows, R then G then B
        rows[name] = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        with open(batches / name, "wb") as f:
            pickle.dump({"data": rows[name], "labels": [0, 1, 2, 9]}, f)
    with open(batches / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)  # md5s of the real files
    d = load_data(cfg.data, str(tmp_path / "cifar"))
    assert d.pixels.shape == (24, 3, 32, 32) and d.classes[9] == "class9"
    np.testing.assert_array_equal(d.source_test, np.arange(20, 24))
    expected = rows["data_batch_1"][1].reshape(3, 32, 32)  # channel-major, as the format says
    np.testing.assert_array_equal(d.pixels[1].numpy(), expected)
