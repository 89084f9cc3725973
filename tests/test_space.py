"""Size before work, room while running: the image store is sized before any image is decoded and
checked against the disk and memory; each trial's files against the disk before it starts.

The disks are real and small: tmpfs mounts the tests make (conftest.small_disk), so the free
space workbench reads is the kernel's. Memory is stubbed (the machine's cannot be made small).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from conftest import CLI_ENV, TINY, run_cli, small_disk, wait_held
from optuna.storages import RetryHeartbeatStaleTrialCallback
from PIL import Image
from test_data import write_idx_pair

from workbench import search
from workbench.config import DataConfig, load_study
from workbench.data import load_data, load_or_make_split
from workbench.data.sources import find_source
from workbench.data.space import check_room, store_size
from workbench.errors import SpaceError
from workbench.files import DISK_RESERVE
from workbench.models import create_model
from workbench.runtime import HOLD
from workbench.tracking import Tracker

MB = 1000**2  # the messages' unit (decimal, as `df -H` and disk makers count)
UNITS = {"B": 1, "kB": 1000, "MB": MB, "GB": 1000**3}


def photo_folder(root: Path, classes: dict[str, int], size: tuple[int, int] = (8, 8)) -> Path:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def parsed(text: str) -> float:
    """'9.4 MB' -> 9.4e6 bytes."""
    value, unit = text.split()
    return float(value) * UNITS[unit]


# --- the store's size, known before decoding ---------------------------------------------------


def test_the_store_size_is_rows_x_channels_x_height_x_width(tmp_path: Path) -> None:
    folder = photo_folder(tmp_path / "photos", {"a": 5, "b": 7}, size=(11, 13))
    # a folder: every photo becomes image_size, decoded as RGB into a scratch copy first
    cfg = DataConfig(source="folder", path=str(folder), image_size=[20, 30])
    size = store_size(find_source(cfg))
    assert (size.shape, size.bytes, size.scratch) == ((12, 3, 20, 30), 12 * 3 * 20 * 30, 21600)
    # without image_size every photo has the first one's size (height 11, width 13)
    size = store_size(find_source(DataConfig(source="folder", path=str(folder))))
    assert size.shape == (12, 3, 11, 13)
    # IDX: the headers' sizes, gzipped or not, a train and a test set: one channel
    write_idx_pair(tmp_path / "idx", "train", 7, gz=True)
    write_idx_pair(tmp_path / "idx", "t10k", 5, gz=False)
    size = store_size(find_source(DataConfig(source="idx", path=str(tmp_path / "idx"))))
    assert (size.shape, size.bytes, size.scratch) == ((12, 1, 4, 3), 12 * 4 * 3, 0)
    assert size.bytes == load_data(DataConfig(source="idx"), str(tmp_path / "idx")).pixels.numel()
    assert store_size(find_source(DataConfig())).bytes == 1797 * 8 * 8  # scikit-learn's digits


def test_a_store_that_cannot_fit_stops_before_decoding_and_one_that_fits_is_built(
    tmp_path: Path,
) -> None:
    folder = photo_folder(tmp_path / "photos", {"a": 6, "b": 6})
    disk = tmp_path / "disk"
    with small_disk(disk, 24 * 2**20):  # 24 MiB: the reserve (16 MiB) and a few MB more
        store = disk / "runs" / "tiny" / "images"
        # 12 photos of 512 x 512 RGB: a 9.4 MB store, 18.9 MB while its scratch copy exists
        big = DataConfig(source="folder", image_size=512)
        with pytest.raises(SpaceError) as short:
            load_data(big, str(folder), store)
        free = shutil.disk_usage(disk).free
        assert str(short.value) == (
            f"the image store of data.path {folder} is 9.4 MB (12 images x 3 channel(s) x 512 x "
            f"512 pixels, one byte each) and needs 18.9 MB while its photos are decoded, but the "
            f"disk of {store} has {free / MB:.1f} MB free, and workbench leaves 16.8 MB of a "
            f"disk free; lower data.image_size (now 512 x 512), use a subset of the images, or "
            f"set output_dir to a folder on a disk with more room"
        )
        assert not any(disk.iterdir())  # nothing was decoded or created
        # 128 x 128: 0.6 MB (1.2 MB with its scratch) fits beside the reserve
        small = load_data(DataConfig(source="folder", image_size=128), str(folder), store)
        assert tuple(small.pixels.shape) == (12, 3, 128, 128)


def test_decoding_in_memory_is_checked_against_the_memory_available(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_idx_pair(tmp_path / "idx", "train", 10, gz=False)  # 10 images of 4 x 3: 120 bytes
    source = find_source(DataConfig(source="idx", path=str(tmp_path / "idx")))
    # the IDX reader holds the file's bytes and the array made from them: 2 x 120 bytes
    monkeypatch.setattr("workbench.data.space.available_memory", lambda: 240)
    assert check_room(source, tmp_path / "store").bytes == 120
    monkeypatch.setattr("workbench.data.space.available_memory", lambda: 239)
    with pytest.raises(SpaceError, match=re.escape(
        "decoding data.source = 'idx' holds the images in memory: 240 B (2 copies of 10 "
        "images x 1 channel(s) x 4 x 3 pixels, one byte each), but this machine has 239 B of "
        "memory available; use a subset of the images, or run on a machine with more memory"
    )):  # fmt: skip
        load_data(DataConfig(source="idx"), str(tmp_path / "idx"), tmp_path / "store")
    assert not (tmp_path / "store").exists()


# --- room for a trial's files, while the study runs ----------------------------------------------


def fill(path: Path, size: int) -> None:
    """A file of `size` zero bytes, written (tmpfs keeps every page written)."""
    chunk = bytes(1 << 20)
    with path.open("wb") as f:
        while size > 0:
            size -= f.write(chunk[: min(size, len(chunk))])


def digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_disk_filled_during_a_study_stops_the_worker_cleanly_and_the_study_resumes(
    tmp_path: Path,
) -> None:
    """`workbench study` on a 48 MiB disk. Its worker waits before fold 1 of trial 0 while the
    test fills the disk to leave room for that trial's last folds, not for another trial. The
    worker stops before trial 1 writes anything, saying what it needs and what is free; with
    the space freed, the same command resumes: trial 1 runs again as it was (parameters,
    folder, seeds), and scores what a study that never stopped scores."""
    disk, go = tmp_path / "disk", tmp_path / "go"
    study = TINY.replace("trials = 3", 'trials = 3\npruner = "none"')
    study += "[ensemble]\nenabled = false\n"  # the search alone is what this test is about
    file = tmp_path / "tiny.toml"
    file.write_text(study.format(out=disk / "runs"))
    out = disk / "runs" / "tiny"
    with small_disk(disk, 48 * 2**20):
        log = tmp_path / "study.log"
        with log.open("w") as sink:
            proc = subprocess.Popen(
                [sys.executable, "-m", "workbench", "study", str(file), "--workers", "1"],
                cwd=tmp_path,
                env={**CLI_ENV, HOLD: f"0/1:{go}"},
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_held(go, proc, log)
            fill(disk / "ballast", shutil.disk_usage(disk).free - DISK_RESERVE - 256 * 1024)
            go.touch()
            code = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        said = log.read_text()
        assert code == 1, said
        assert "Traceback" not in said
        (line,) = [s for s in said.splitlines() if s.startswith("worker 0 stopped: ")]
        stated = re.search(
            r"models\.mlp trial 1 needs (\S+ \S+) on disk \((\d+) parameters in 3 fold "
            r"checkpoints, and its out-of-fold probabilities\), but the disk of "
            rf"{re.escape(str(out / 'trials' / 'mlp' / '0001'))} has (\S+ \S+) free, and "
            r"workbench leaves 16\.8 MB of a disk free; the 2 runs of 'mlp' still to come need "
            r"about (\S+ \S+)\. Free space there, or set output_dir to a folder on a disk with "
            r"more room, then run the same command again: the study resumes with this run",
            line,
        )
        assert stated, line
        need, params, free, both = stated.groups()
        net = create_model("mlp", 10, (1, 8, 8), width=64)  # built for real, on the CPU
        assert int(params) == sum(p.numel() for p in net.parameters())
        assert parsed(free) < parsed(need) + DISK_RESERVE  # short indeed
        assert parsed(both) == pytest.approx(2 * parsed(need), abs=0.05 * MB)  # 0.1 MB shown

        storage = search.storage_url(load_study(file))
        trials = optuna.load_study(study_name="tiny/mlp", storage=storage).get_trials()
        assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "WAITING"]
        stopped, queued = trials[1], trials[2]
        assert stopped.user_attrs["disk_short"] and "disk_short" not in queued.user_attrs
        assert queued.params == stopped.params and queued.user_attrs["first_try"] == 1
        assert not (out / "trials" / "mlp" / "0001").exists()  # it wrote nothing
        first = digests(out / "trials" / "mlp" / "0000")

        (disk / "ballast").unlink()  # space freed: the same command resumes
        again = run_cli("study", str(file), "--workers", "1", cwd=tmp_path)
        assert again.returncode == 0, again.stdout + again.stderr
        trials = optuna.load_study(study_name="tiny/mlp", storage=storage).get_trials()
        assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
        retry = trials[2]
        assert RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == 1
        assert retry.params == stopped.params and retry.user_attrs["dir"] == "trials/mlp/0001"
        assert digests(out / "trials" / "mlp" / "0000") == first  # kept as it was
        written = out / "trials" / "mlp" / "0001"
        assert sum(p.stat().st_size for p in written.rglob("*") if p.is_file()) <= parsed(need)

    # a study that never stopped: the same trial 1, the same scores
    control = tmp_path / "control.toml"
    control.write_text(study.replace("trials = 3", "trials = 2").format(out=tmp_path / "control"))
    cfg = load_study(control)
    data = load_data(cfg.data)
    split = load_or_make_split(data, cfg.data, cfg.seed, cfg.out / "split.npz")
    search.create_studies(cfg, search.open_storage(cfg))
    search.run_worker(cfg, data, split, Tracker(cfg, enabled=False), worker=0)
    unstopped = optuna.load_study(study_name="tiny/mlp", storage=search.storage_url(cfg)).trials
    assert unstopped[1].params == retry.params
    assert unstopped[1].user_attrs["fold_scores"] == retry.user_attrs["fold_scores"]
