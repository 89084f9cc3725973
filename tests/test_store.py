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


class FolderRemote:
    """A remote that is another folder (as a second host's view of a shared artifact store);
    it records the order of uploads."""

    def __init__(self, root: Path) -> None:
        self.root, self.puts = root, []

    def put(self, key: str, path: Path) -> None:
        self.puts.append(key)
        (self.root / key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, self.root / key)

    def uri(self, key: str) -> str:
        return f"folder:{self.root / key}"

    def get(self, uri: str, dest: Path) -> Path | None:
        src = Path(uri.removeprefix("folder:"))
        if not src.exists():
            return None
        shutil.copytree(src, dest / src.name)
        return dest / src.name


def test_a_remote_gets_each_file_once_folds_as_they_end_and_the_record_last(
    tmp_path: Path,
) -> None:
    remote = FolderRemote(tmp_path / "remote")
    store = RunStore(tmp_path / "host-a", remote)
    run = store.trial("mlp", 3)
    (run / "snap-0").mkdir(parents=True)
    for name in ("fold-0.pt", "snap-0/fold-0.pt", "oof.npz", "history.json", "snap-0/oof.npz"):
        (run / name).write_bytes(name.encode())
    record = FoldRecord(np.arange(3), np.full((3, 2), 0.5), np.full((1, 3, 2), 0.5), [], 0)
    store.write_fold(run, 0, record)
    fold = [f"trials/mlp/0003/{n}" for n in ("fold-0.pt", "snap-0/fold-0.pt", "fold-0.json")]
    assert remote.puts == [*fold, "trials/mlp/0003/fold-0.npz"]  # the marker last
    manifest = store.seal(run)
    assert manifest["uri"] == f"folder:{tmp_path / 'remote' / 'trials/mlp/0003'}"
    assert sorted(remote.puts[4:]) == [
        "trials/mlp/0003/history.json",
        "trials/mlp/0003/oof.npz",
        "trials/mlp/0003/snap-0/oof.npz",
    ]
    assert len(remote.puts) == len(set(remote.puts)) == len(manifest["files"])  # once each

    # another host: the sealed run is fetched into its cache, checked, and reused
    other = RunStore(tmp_path / "host-b", FolderRemote(tmp_path / "remote"))
    got = other.open_run(manifest, other.trial("mlp", 3), "mlp/trial-3")
    assert got.parent == tmp_path / "host-b" / "cache"
    assert (got / "snap-0" / "fold-0.pt").read_bytes() == b"snap-0/fold-0.pt"
    assert other.open_run(manifest, other.trial("mlp", 3), "mlp/trial-3") == got
    (got / "oof.npz").write_bytes(b"tampered")  # a torn or changed copy is fetched again
    assert (
        other.open_run(manifest, other.trial("mlp", 3), "mlp/trial-3") / "oof.npz"
    ).read_bytes() == b"oof.npz"


def test_pull_fetches_only_what_this_host_lacks(tmp_path: Path) -> None:
    remote = FolderRemote(tmp_path / "remote")
    for name, data in (("fold-0.pt", b"remote 0"), ("fold-1.pt", b"remote 1")):
        remote.put(f"trials/mlp/0000/{name}", _file(tmp_path, data))
    store = RunStore(tmp_path / "host", remote)
    run = store.trial("mlp", 0)
    run.mkdir(parents=True)
    (run / "fold-0.pt").write_bytes(b"local 0")
    assert store.pull(run) == ["fold-1.pt"]
    assert (run / "fold-0.pt").read_bytes() == b"local 0"  # kept as it was
    assert (run / "fold-1.pt").read_bytes() == b"remote 1"
    assert (
        RunStore(tmp_path / "fresh", remote).pull(RunStore(tmp_path / "fresh").trial("mlp", 9))
        == []
    )


def _file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "upload.tmp"
    path.write_bytes(data)
    return path
