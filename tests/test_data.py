"""workbench.data: the four sources, the held-out split, CV folds and batch augmentation."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.config import AugmentConfig, DataConfig
from workbench.data import (
    ImageData,
    Split,
    augment_batch,
    channel_stats,
    cv_folds,
    data_fingerprint,
    load_data,
    load_or_make_split,
    make_split,
)
from workbench.errors import ConfigError, DataError

MNIST_T10K = Path(__file__).parents[2] / "shared/data/mnist-t10k"


def write_idx(path: Path, arr: np.ndarray, magic: int | None = None) -> Path:
    """An IDX file by hand: big-endian magic (2051 images / 2049 labels), sizes, uint8 bytes."""
    magic = magic if magic is not None else (2051 if arr.ndim == 3 else 2049)
    raw = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    raw += arr.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def write_idx_pair(folder: Path, prefix: str, n: int, gz: bool, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 4, 3), dtype=np.uint8)
    labels = np.arange(n) % 10
    ext = ".gz" if gz else ""
    write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels)
    return images


def idx(path: Path) -> ImageData:
    return load_data(DataConfig(source="idx"), str(path))


# --- digits and IDX ----------------------------------------------------------------------------


def test_digits() -> None:
    from sklearn.datasets import load_digits

    d = load_data(DataConfig())
    assert d.pixels.shape == (1797, 1, 8, 8) and d.pixels.dtype == torch.uint8 and d.scale == 16
    x = d.images()  # float32 in [0, 1]: the 0..16 pixel values divided by 16, exactly
    np.testing.assert_array_equal(x[:, 0].numpy(), load_digits().images / 16.0)
    assert d.num_classes == 10 and d.in_shape == (1, 8, 8) and d.source_test is None
    assert set(d.y.tolist()) == set(range(10))


def test_idx_real_mnist_test_set() -> None:
    if not MNIST_T10K.is_dir():
        pytest.skip(f"the real MNIST test files are not at {MNIST_T10K} (shared/ beside the repo)")
    d = idx(MNIST_T10K)
    assert d.pixels.shape == (10000, 1, 28, 28) and d.source_test is None
    assert d.classes == tuple("0123456789")
    assert int(d.pixels.max()) == 255 and float(d.images(np.arange(100)).max()) == 1.0
    assert np.bincount(d.y.numpy()).min() > 800  # about 1,000 images per digit


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip_train_and_t10k(tmp_path: Path, gz: bool) -> None:
    train = write_idx_pair(tmp_path, "train", 20, gz, seed=1)
    test = write_idx_pair(tmp_path, "t10k", 10, gz, seed=2)
    d = idx(tmp_path)
    assert d.pixels.shape == (30, 1, 4, 3)
    np.testing.assert_array_equal(d.pixels.numpy(), np.concatenate([train, test])[:, None])
    np.testing.assert_array_equal(d.source_test, np.arange(20, 30))
    assert d.y.tolist() == [i % 10 for i in range(20)] + list(range(10))


def test_idx_single_pair_or_images_file_is_the_whole_dataset(tmp_path: Path) -> None:
    write_idx_pair(tmp_path, "digits", 12, gz=True)
    assert idx(tmp_path).source_test is None and len(idx(tmp_path).y) == 12
    d = idx(tmp_path / "digits-images-idx3-ubyte.gz")
    assert d.pixels.shape == (12, 1, 4, 3)


def test_idx_wrong_magic_names_file_and_number(tmp_path: Path) -> None:
    write_idx_pair(tmp_path, "train", 5, gz=True)
    bad = write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((5, 4, 3)), magic=2049)
    with pytest.raises(DataError, match=rf"{re.escape(str(bad))} has magic number 2049.*2051"):
        idx(tmp_path)


def test_idx_truncated_names_file(tmp_path: Path) -> None:
    write_idx_pair(tmp_path, "train", 5, gz=False)
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-7])
    with pytest.raises(DataError, match=rf"{re.escape(str(images))} is truncated.*76 bytes"):
        idx(tmp_path)


def test_idx_count_mismatch(tmp_path: Path) -> None:
    write_idx_pair(tmp_path, "train", 5, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4))
    with pytest.raises(DataError, match=r"5 images .*train-labels-idx1-ubyte holds 4 labels"):
        idx(tmp_path)


def test_idx_labels_beyond_digits_become_sorted_classes(tmp_path: Path) -> None:
    write_idx(tmp_path / "a-images-idx3-ubyte", np.zeros((3, 2, 2)))
    write_idx(tmp_path / "a-labels-idx1-ubyte", np.array([26, 1, 12]))
    d = idx(tmp_path)
    assert d.classes == ("1", "12", "26") and d.y.tolist() == [2, 0, 1]


def test_missing_and_nonexistent_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.path is not set: pass --data PATH"):
        load_data(DataConfig(source="idx"))
    with pytest.raises(DataError, match=r"nowhere.*does not exist"):
        load_data(DataConfig(source="folder", path=str(tmp_path / "nowhere")))
    write_idx_pair(tmp_path, "x", 3, gz=False)  # --data overrides data.path
    assert len(load_data(DataConfig(source="idx", path="/nowhere"), str(tmp_path)).y) == 3


def test_labels_outside_class_list() -> None:
    with pytest.raises(DataError, match=r"labels must lie in \[0, 2\)"):
        ImageData(torch.zeros(2, 1, 2, 2), torch.tensor([0, 2]), ("a", "b"), "test")


# --- torchvision -------------------------------------------------------------------------------


def test_torchvision_reads_a_fake_mnist_root(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"  # torchvision reads the unzipped IDX files here
    write_idx_pair(raw, "train", 20, gz=False)
    write_idx_pair(raw, "t10k", 10, gz=False)
    d = load_data(DataConfig(source="torchvision", dataset="MNIST", path=str(tmp_path)))
    assert d.pixels.shape == (30, 1, 4, 3) and d.num_classes == 10
    np.testing.assert_array_equal(d.source_test, np.arange(20, 30))


def test_torchvision_missing_root_and_unknown_name(tmp_path: Path) -> None:
    cfg = DataConfig(source="torchvision", dataset="FashionMNIST", path=str(tmp_path))
    with pytest.raises(DataError, match=r"FashionMNIST/raw/train-images-idx3-ubyte"):
        load_data(cfg)
    cfg = DataConfig(source="torchvision", dataset="CIFAR11", path=str(tmp_path))
    with pytest.raises(DataError, match=r"'CIFAR11'.*did you mean 'CIFAR10'.*FashionMNIST"):
        load_data(cfg)


# --- image folders -----------------------------------------------------------------------------


def write_png(path: Path, arr: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return path


def gray_folder(root: Path, size: tuple[int, int] = (6, 5)) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    images = {c: [rng.integers(0, 256, size) for _ in range(3)] for c in ("zebra", "ant")}
    for c, arrs in images.items():
        for i, a in enumerate(arrs):
            write_png(root / c / f"{i}.png", a)
    (root / "zebra" / "notes.txt").write_text("not an image: skipped")
    return images


def folder(root: Path, size: tuple[int, int] | None = None, **data: object) -> ImageData:
    return load_data(DataConfig(source="folder", image_size=size, **data), str(root))


def test_folder_grayscale_sorted_classes(tmp_path: Path) -> None:
    images = gray_folder(tmp_path)
    d = folder(tmp_path)
    assert d.classes == ("ant", "zebra") and d.pixels.shape == (6, 1, 6, 5)
    assert d.y.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(d.pixels[0, 0].numpy(), images["ant"][0])


def test_folder_any_colour_image_makes_rgb_and_resize(tmp_path: Path) -> None:
    gray_folder(tmp_path)
    write_png(tmp_path / "ant" / "colour.png", np.full((9, 7, 3), 200))
    with pytest.raises(DataError, match=r"differ in size.*6x5.*9x7.*data\.image_size = \[h, w\]"):
        folder(tmp_path)
    d = folder(tmp_path, (4, 3), resize_policy="stretch")
    assert d.pixels.shape == (7, 3, 4, 3)
    np.testing.assert_array_equal(d.pixels[3].numpy(), 200)  # the colour image, resized


def test_folder_unreadable_file_is_named(tmp_path: Path) -> None:
    gray_folder(tmp_path)
    bad = tmp_path / "ant" / "broken.png"
    bad.write_bytes(b"definitely not a PNG")
    with pytest.raises(DataError, match=re.escape(str(bad))):
        folder(tmp_path)


def test_folder_needs_two_classes_each_with_images(tmp_path: Path) -> None:
    write_png(tmp_path / "only" / "a.png", np.zeros((3, 3)))
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path))} has 1 class.*needs >= 2"):
        folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=rf"class folder {re.escape(str(tmp_path / 'empty'))}"):
        folder(tmp_path)


# --- summaries and splits ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> ImageData:
    return load_data(DataConfig())


def test_channel_stats_and_fingerprint(digits: ImageData) -> None:
    from sklearn.datasets import load_digits

    x = load_digits().images / 16.0  # float64, computed without workbench
    mean, std = channel_stats(digits.rows())
    assert mean == pytest.approx([x.mean()], rel=1e-12)
    assert std == pytest.approx([x.std()], rel=1e-9)
    rows = np.arange(0, 1797, 7)  # a subset, as a fold holds
    assert channel_stats(digits.rows(rows))[0] == pytest.approx([x[rows].mean()], rel=1e-12)
    fp = data_fingerprint(digits)
    assert len(fp) == 12 and fp == data_fingerprint(load_data(DataConfig()))
    changed = ImageData(digits.pixels, digits.y.flip(0), digits.classes, "flipped labels")
    assert data_fingerprint(changed) != fp


def test_stratified_split(digits: ImageData) -> None:
    s = make_split(digits, DataConfig(test_size=0.2), seed=3)
    assert s.kind == "stratified" and s.fingerprint == data_fingerprint(digits)
    assert len(np.intersect1d(s.train_idx, s.test_idx)) == 0
    np.testing.assert_array_equal(np.union1d(s.train_idx, s.test_idx), np.arange(1797))
    assert (np.diff(s.test_idx) > 0).all() and s.train_idx.dtype == np.int64
    y = digits.y.numpy()
    assert np.all(np.abs(np.bincount(y[s.test_idx]) - 0.2 * np.bincount(y)) <= 1)


def test_source_split_used_when_the_source_has_one(digits: ImageData) -> None:
    test = np.arange(1500, 1797)
    d = ImageData(digits.pixels, digits.y, digits.classes, "with test", source_test=test)
    s = make_split(d, DataConfig(), seed=0)
    assert s.kind == "source"
    np.testing.assert_array_equal(s.test_idx, test)
    np.testing.assert_array_equal(s.train_idx, np.arange(1500))
    assert make_split(d, DataConfig(use_source_test=False), seed=0).kind == "stratified"


def test_split_is_saved_once_and_checked(digits: ImageData, tmp_path: Path) -> None:
    path = tmp_path / "out" / "split.npz"
    first = load_or_make_split(digits, DataConfig(), seed=1, path=path)
    again = load_or_make_split(digits, DataConfig(), seed=2, path=path)  # seed ignored: reused
    assert isinstance(again, Split) and again.kind == first.kind
    np.testing.assert_array_equal(again.train_idx, first.train_idx)
    np.testing.assert_array_equal(again.test_idx, first.test_idx)
    x = digits.pixels.clone()
    x[0, 0, 0, 0] += 1
    changed = ImageData(x, digits.y, digits.classes, "changed")
    with pytest.raises(DataError, match=rf"data changed.*fingerprint was {first.fingerprint}"):
        load_or_make_split(changed, DataConfig(), seed=1, path=path)


def test_cv_folds_are_stratified_partitions(digits: ImageData) -> None:
    y = digits.y.numpy()[::2]
    folds = cv_folds(y, 4, seed=0)
    assert len(folds) == 4
    seen = np.concatenate([va for _, va in folds])
    np.testing.assert_array_equal(np.sort(seen), np.arange(len(y)))  # each position once
    for tr, va in folds:
        assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(y)
        assert np.all(np.abs(np.bincount(y[va]) - np.bincount(y) / 4) <= 1)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, cv_folds(y, 4, 0), strict=True))


def labelings(count: int) -> list[tuple[np.ndarray, int]]:
    """`count` (labels, seed) pairs: 2 to 11 classes, 4 to 400 rows, balanced to very skewed,
    label values with gaps (a class number no row has), every class with >= 4 rows."""
    rng = np.random.default_rng(7)
    out = []
    for _ in range(count):
        k = int(rng.integers(2, 12))
        values = np.sort(rng.choice(3 * k, size=k, replace=False))  # e.g. 0, 4, 5, 11
        p = rng.dirichlet(np.full(k, float(rng.choice([0.3, 1.0, 5.0]))))
        y = values[
            np.concatenate(
                [np.repeat(np.arange(k), 4), rng.choice(k, int(rng.integers(0, 360)), p=p)]
            )
        ]
        rng.shuffle(y)
        out.append((y, int(rng.integers(0, 2**32))))
    return out


@pytest.mark.parametrize("test_size", [0.1, 0.2, 1 / 3, 0.5])
def test_split_draws_the_rows_scikit_learn_draws(test_size: float) -> None:
    # the split is written out in numpy (splits.py says why); a seed must keep giving the rows
    # scikit-learn's stratified train_test_split gives it, or a resumed study's rows would move
    from sklearn.model_selection import train_test_split

    for y, seed in labelings(60):
        d = ImageData(
            torch.zeros(len(y), 1, 1, 1),
            torch.as_tensor(y),
            tuple(map(str, range(y.max() + 1))),
            "labels",
        )
        try:
            train, test = train_test_split(
                np.arange(len(y)), test_size=test_size, random_state=seed, stratify=y
            )
        except ValueError:  # fewer test rows than classes: the split must refuse too
            with pytest.raises(DataError, match=r"data\.test_size"):
                make_split(d, DataConfig(test_size=test_size), seed)
            continue
        s = make_split(d, DataConfig(test_size=test_size), seed)
        np.testing.assert_array_equal(s.train_idx, np.sort(train))
        np.testing.assert_array_equal(s.test_idx, np.sort(test))


@pytest.mark.parametrize("folds", [2, 3, 4])
def test_cv_folds_are_the_folds_scikit_learn_makes(folds: int) -> None:
    from sklearn.model_selection import StratifiedKFold

    for y, seed in labelings(60):
        ours = cv_folds(y, folds, seed)
        theirs = StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)
        for (tr, va), (tr_sk, va_sk) in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(tr, tr_sk)
            np.testing.assert_array_equal(va, va_sk)
            assert tr.dtype == va.dtype == np.int64


def test_split_refuses_a_class_of_one_row() -> None:
    y = np.array([0] * 20 + [1] * 20 + [2])
    d = ImageData(torch.zeros(len(y), 1, 1, 1), torch.as_tensor(y), ("cat", "dog", "eel"), "labels")
    with pytest.raises(DataError, match=r"smallest class 'eel' has 1 row"):
        make_split(d, DataConfig(), seed=0)


def test_cv_folds_more_than_smallest_class() -> None:
    y = np.array([0] * 10 + [1] * 3)
    with pytest.raises(ConfigError, match=r"cv\.folds = 5 and class 1 has 3"):
        cv_folds(y, 5, seed=0)


# --- augmentation ------------------------------------------------------------------------------


def distinct_images(b: int = 16, c: int = 2, h: int = 7, w: int = 6) -> torch.Tensor:
    return torch.arange(1, b * c * h * w + 1, dtype=torch.float32).reshape(b, c, h, w)


def translated(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """img (C, H, W) moved down by dy and right by dx, zeros where nothing moved in."""
    out = torch.zeros_like(img)
    _, h, w = img.shape
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = img[
        :, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def moves(out: torch.Tensor, img: torch.Tensor, shift: int) -> set[tuple[int, int]]:
    r = range(-shift, shift + 1)
    return {(dy, dx) for dy in r for dx in r if torch.equal(out, translated(img, dy, dx))}


def test_augment_off_returns_the_same_object() -> None:
    x = distinct_images()
    assert augment_batch(x, AugmentConfig(), torch.Generator().manual_seed(0)) is x


def test_augment_shift_translates_each_image(tmp_path: Path) -> None:
    x = distinct_images(b=32)
    out = augment_batch(x, AugmentConfig(shift=2), torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out is not x
    found = [moves(out[i], x[i], 2) for i in range(len(x))]
    assert all(len(f) == 1 for f in found)  # every image is one translation of itself
    assert len({next(iter(f)) for f in found}) > 5  # drawn per image, not once per batch


def test_augment_hflip_per_image_and_deterministic() -> None:
    x = distinct_images(b=64)
    cfg = AugmentConfig(hflip=True)
    out = augment_batch(x, cfg, torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(64)]
    same = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f != s for f, s in zip(flipped, same, strict=True))
    assert 10 < sum(flipped) < 54
    both = AugmentConfig(shift=1, hflip=True)
    a = augment_batch(x, both, torch.Generator().manual_seed(7))
    assert torch.equal(a, augment_batch(x, both, torch.Generator().manual_seed(7)))
    assert not torch.equal(a, augment_batch(x, both, torch.Generator().manual_seed(8)))
    for i in range(8):  # shift + flip: a translation of the image or of its mirror
        assert moves(a[i], x[i], 1) or moves(a[i], x[i].flip(-1), 1)


def test_mixup_mixes_each_image_with_its_neighbour_by_the_target_weights() -> None:
    from workbench.data import batch_mixer

    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 5, 5), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    mixer = batch_mixer(AugmentConfig(mixup=0.4), num_classes=4)
    assert mixer is not None and batch_mixer(AugmentConfig(), 4) is None
    mixed, target = mixer(x, y)
    assert target.shape == (8, 4)
    np.testing.assert_allclose(target.sum(1).numpy(), 1.0, rtol=1e-6)
    lam = float(target[0, y[0]])  # v2.MixUp pairs image i with image i-1 (the batch rolled by 1)
    expected = lam * x + (1 - lam) * x.roll(1, 0)
    np.testing.assert_allclose(mixed.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    onehot = torch.nn.functional.one_hot(y, 4).float()
    expected_target = lam * onehot + (1 - lam) * onehot.roll(1, 0)
    np.testing.assert_allclose(target.numpy(), expected_target.numpy(), rtol=1e-5, atol=1e-6)


def test_per_image_steps_give_each_image_its_own_draw() -> None:
    from workbench.data import per_image

    assert per_image(AugmentConfig(shift=2, hflip=True), (8, 8)) is None  # batched path only
    cfg = AugmentConfig(crop_scale=0.3, rotation=30, color_jitter=0.4, erasing=1.0)
    pipeline = per_image(cfg, (12, 12))
    names = [type(t).__name__ for t in pipeline.transforms]
    assert names == ["RandomResizedCrop", "RandomRotation", "ColorJitter", "RandomErasing"]
    torch.manual_seed(0)
    x = torch.rand(1, 3, 12, 12).expand(6, 3, 12, 12).contiguous()  # six copies of one image
    before = x.clone()
    out = augment_batch(x, cfg, torch.Generator().manual_seed(0), pipeline)
    assert out.shape == x.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert len({out[i].numpy().tobytes() for i in range(6)}) == 6  # not one draw per batch
    assert torch.equal(x, before)  # the batch drawn from the store is not changed in place


def test_rows_gather_batches_by_index_as_float_in_unit_range() -> None:
    pixels = torch.arange(5 * 1 * 2 * 2, dtype=torch.uint8).reshape(5, 1, 2, 2) * 10
    rows = ImageData(pixels, torch.tensor([0, 1, 0, 1, 0]), ("a", "b"), "t").rows([4, 1, 3])
    sub = rows.subset([2, 0])  # rows 3 and 4 of the array
    assert sub.labels.tolist() == [1, 0] and len(sub) == 2
    batch = sub.batch(torch.tensor([1, 0]))
    assert batch.dtype == torch.float32
    np.testing.assert_allclose(batch.numpy(), pixels[[4, 3]].numpy() / 255.0, rtol=1e-6)
    moved = sub.to("cpu")  # on a GPU host: the whole array copied there once
    assert torch.equal(moved.batch(torch.tensor([1, 0])), batch)
