"""The run store: a sealed run's manifest, checked on every read; fold records that a retry keeps.

Expected digests are computed here with hashlib, not with the store's own helper.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from workbench.errors import CheckpointError
from workbench.store import FoldRecord, RunStore


def make_run(store: RunStore) -> Path:
    run = store.trial("cnn", 7)
    (run / "snap-0").mkdir(parents=True)
    (run / "fold-0.pt").write_bytes(b"weights of fold 0")
    (run / "oof.npz").write_bytes(b"\x00" * 1000)
    (run / "snap-0" / "fold-0.pt").write_bytes(b"snapshot weights")
    (run / ".claimed").write_bytes(b"")  # hidden: a lock, not a result
    return run


def test_layout_is_relative_to_the_study_folder(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "runs" / "digits")
    run = store.trial("cnn", 7)
    assert run == tmp_path / "runs" / "digits" / "trials" / "cnn" / "0007"
    assert store.relative(run) == "trials/cnn/0007"
    assert store.checkpoint(run, 2) == run / "fold-2.pt"
    assert store.final == tmp_path / "runs" / "digits" / "ensemble" / "final"


def test_seal_lists_every_file_with_its_sha256_and_size(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    run = make_run(store)
    manifest = store.seal(run)
    assert manifest["uri"] == run.resolve().as_uri()
    assert manifest["files"] == {
        "fold-0.pt": {"sha256": hashlib.sha256(b"weights of fold 0").hexdigest(), "bytes": 17},
        "oof.npz": {"sha256": hashlib.sha256(b"\x00" * 1000).hexdigest(), "bytes": 1000},
        "snap-0/fold-0.pt": {
            "sha256": hashlib.sha256(b"snapshot weights").hexdigest(),
            "bytes": 16,
        },
    }
    assert store.open_run(manifest, run, "cnn/trial-7") == run


def test_a_file_changed_after_sealing_is_named(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    run = make_run(store)
    manifest = store.seal(run)
    (run / "snap-0" / "fold-0.pt").write_bytes(b"snapshot weighty")  # same size, other bytes
    with pytest.raises(CheckpointError, match=r"cnn/trial-7: .*snap-0/fold-0\.pt does not match"):
        store.open_run(manifest, run, "cnn/trial-7")
    (run / "oof.npz").unlink()
    with pytest.raises(CheckpointError, match=r"oof\.npz is missing"):
        store.open_run(manifest, run, "cnn/trial-7")


def test_a_run_sealed_on_another_host_says_where_it_is(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    run = make_run(store)
    manifest = store.seal(run)
    shutil.rmtree(run)
    with pytest.raises(CheckpointError, match="not on this host"):
        store.open_run(manifest, run, "cnn/trial-7")


def test_a_fold_record_is_complete_only_with_all_its_files(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    run = store.trial("mlp", 0)
    rows, proba = np.array([3, 5, 8]), np.full((3, 2), 0.5)
    snaps = np.stack([proba, proba])
    record = FoldRecord(rows, proba, snaps, [{"val_loss": 0.7}], best_epoch=0)
    assert store.read_fold(run, 1) is None  # nothing written yet
    store.checkpoint(store.snapshot(run, 0), 1).parent.mkdir(parents=True)
    store.checkpoint(run, 1).write_bytes(b"w")
    store.checkpoint(store.snapshot(run, 0), 1).write_bytes(b"w")
    store.write_fold(run, 1, record)
    assert store.read_fold(run, 1) is None  # snapshot 1 of 2 has no checkpoint
    store.checkpoint(store.snapshot(run, 1), 1).parent.mkdir()
    store.checkpoint(store.snapshot(run, 1), 1).write_bytes(b"w")
    got = store.read_fold(run, 1)
    assert got is not None and got.history == [{"val_loss": 0.7}] and got.best_epoch == 0
    np.testing.assert_array_equal(got.rows, rows)
    np.testing.assert_array_equal(got.snap_proba, snaps)
    (run / "fold-1.npz").write_bytes(b"half a file")  # a torn write: train the fold again
    assert store.read_fold(run, 1) is None
