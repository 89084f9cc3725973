"""Every bad input through the command line, one table: each case is a study file (the tiny study
with a snippet replaced or appended) and/or arguments, run as a user runs it. Each exits 2 with no
traceback, prints the hand-written fragment naming the file or key and what would be valid, and
leaves the output folder (with a file from an earlier run in it) byte-identical."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import CLI_ENV, TINY, free_port, run_cli, small_disk, tree
from PIL import Image

# Placeholders in snippets, args and fragments: @TMP is the test's folder, @PORT a closed port,
# @FILE the study file.
OPEN_TRACKING = "[tracking]\nenabled = false"


def photos(root: Path, classes: dict[str, int]) -> None:
    """An image folder: `classes` maps each class to its number of 8x8 PNGs (0: an empty folder)."""
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def table(root: Path, rows: list[tuple[str, str, str]], header: str = "file,dx,patient") -> None:
    """A table `root`/labels.csv of (file, label, group) rows; each file named is made as an
    8x8 PNG in `root`/img/ unless its name starts with "missing"."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    for name, _, _ in rows:
        if not name.startswith("missing"):
            pixels = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "img" / f"{name}.png")
    lines = [header] + [f"img/{name},{label},{group}" for name, label, group in rows]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")


def patients(count: int, per: int = 3, label: Callable[[int], str] = lambda p: "ab"[p % 2]):
    """Rows of `count` patients with `per` images each; patient p's images have label(p)."""
    return [(f"{p}-{i}", label(p), f"P{p}") for p in range(count) for i in range(per)]


TABLE = '[data]\nsource = "table"\npath = "@TMP/t/labels.csv"\nsuffix = ".png"\n'
TABLE_COLUMNS = 'columns = { path = "file", label = "dx" }\n'
GROUPED = (("folds = 3", 'folds = 3\ngroup_by = "patient"'),)


@dataclass(frozen=True)
class Case:
    fragments: tuple[str, ...]  # each must appear in the output, whitespace collapsed
    args: tuple[str, ...] = ("study", "@FILE")
    replace: tuple[tuple[str, str], ...] = ()  # (old, new) in the tiny study's text
    top: str = ""  # lines before its first table
    extra: str = ""  # appended: lands in [models.mlp.space] unless it opens a table
    setup: Callable[[Path], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    ours: bool = True  # workbench's `error: ...`; typer's own usage errors print a box
    hidden: str = ""  # must NOT appear (a password)
    names_file: bool = True  # the study file's path is in the message
    known_bug: str = ""  # a strict xfail: the product does not yet do this; says what it does
    disk: int = 0  # bytes: the output folder's parent (@TMP/runs) is a tmpfs of this size


CASES: dict[str, Case] = {
    "toml-syntax": Case(("@FILE: TOML syntax error:", "(at line"), extra="[cv\n"),
    "unknown-top-level-key": Case(("nmae: unknown key",), top='nmae = "x"'),
    "unknown-train-key": Case(
        ("train.epoch: unknown key; did you mean 'epochs'?",),
        replace=(("epochs = 2", "epoch = 2"),),
    ),
    "wrong-type": Case(
        ("cv.folds: Input should be a valid integer (got 'five')",),
        replace=(("folds = 3", 'folds = "five"'),),
    ),
    "low-above-high": Case(
        ("models.mlp.space.lr: `low <= high` must hold, but got low=1.0, high=0.01",),
        replace=(
            ("lr = { low = 1e-3, high = 3e-2, log = true }", "lr = { low = 1.0, high = 0.01 }"),
        ),
    ),
    "unknown-model": Case(
        ("models.vit: unknown model 'vit'; registered models:",), extra="[models.vit]\n"
    ),
    "unknown-hyperparameter": Case(
        ("models.mlp.space.widht: 'mlp' has no hyperparameter 'widht'; did you mean 'width'?",),
        extra="widht = { low = 8, high = 16 }\n",
    ),
    "dropout-high-1.5": Case(
        (
            "models.mlp.space.dropout: the range's high end 1.5 is out of range; "
            "'mlp' dropout must be a float in [0, 1)",
        ),
        replace=(("high = 0.3", "high = 1.5"),),
    ),
    "resnet-depth-50": Case(
        (
            "models.resnet.space.depth: choice 50 is not valid; "
            "'resnet' depth must be one of [10, 18, 34]",
        ),
        extra="[models.resnet.space]\ndepth = { choices = [18, 50] }\n",
    ),
    "mlp-width-0": Case(
        ("models.mlp.params.width: 0 is out of range; 'mlp' width must be an int >= 1",),
        replace=(("width = 64", "width = 0"),),
    ),
    "cycles-above-epochs": Case(
        (
            "models.mlp: space.epochs low end 3 with params.cycles = 5 breaks a [train] rule: "
            "`cycles <= epochs` must hold for schedule = 'cosine_restarts', but got cycles=5, "
            "epochs=3",
        ),
        replace=(
            ("[train]\n", '[train]\nschedule = "cosine_restarts"\n'),
            ("epochs = 2", "epochs = 6"),  # [train] itself is fine: the space's corner is not
            ("width = 64", "width = 64, cycles = 5"),
        ),
        extra="epochs = { low = 3, high = 6 }\n",
    ),
    "artifacts-mlflow-tracking-off": Case(
        (
            "tracking.artifacts = 'mlflow' keeps trial files in MLflow, but tracking.enabled is "
            "false; enable tracking or set tracking.artifacts = 'local'",
        ),
        replace=(("enabled = false", 'enabled = false\nartifacts = "mlflow"'),),
    ),
    "folds-above-smallest-class": Case(
        (
            "`cv.folds` must be <= the smallest class count so every fold sees every class, but "
            "cv.folds = 500 and class '8' has 139 training row(s); use cv.folds <= 139",
        ),
        replace=(("folds = 3", "folds = 500"),),
    ),
    "idx-without-data-path": Case(
        ("data.path is not set: pass --data PATH or set data.path in the study file",),
        extra='[data]\nsource = "idx"\n',
        names_file=False,
    ),
    "data-path-missing": Case(
        ("data.path '@TMP/no-such-folder' does not exist",),
        extra='[data]\nsource = "idx"\npath = "@TMP/no-such-folder"\n',
        names_file=False,  # it names the key, folder or option instead
    ),
    "image-size-0": Case(
        ("data.image_size: an int (a square) or [height, width], each >= 1",),
        extra='[data]\nsource = "folder"\npath = "@TMP/photos"\nimage_size = 0\n',
    ),
    "unknown-augmentation": Case(
        ("data.augment.auto_augment: Input should be 'none', 'trivial' or 'rand' (got 'auto')",),
        extra='[data.augment]\nauto_augment = "auto"\n',
    ),
    "unknown-augmentation-key": Case(
        ("data.augment.rotate: unknown key; did you mean 'rotation'?",),
        extra="[data.augment]\nrotate = 10\n",
    ),
    "searched-mixup-below-0": Case(
        ("models.mlp.space.mixup: the range's low end -0.5 is not a valid `data.augment.mixup`",),
        extra="mixup = { low = -0.5, high = 0.2 }\n",
    ),
    "cuda-without-gpu": Case(
        (
            "@FILE: device = 'cuda', but no CUDA device is visible on this machine",
            "use device = 'auto' (a GPU where there is one) or 'cpu'",
        ),
        top='device = "cuda"',
        env={"CUDA_VISIBLE_DEVICES": ""},
    ),
    "output-dir-under-a-file": Case(
        (
            "@FILE: output_dir = '@TMP/runs/plain.txt/out'",
            "@TMP/runs/plain.txt is a file, not a folder; set output_dir to a writable folder",
        ),
        replace=(("@TMP/runs", "@TMP/runs/plain.txt/out"),),
        setup=lambda t: (t / "runs" / "plain.txt").write_text("a file\n"),
    ),
    "unreachable-mlflow": Case(
        (
            "cannot reach the MLflow tracking server tracking.uri = 'http://127.0.0.1:@PORT'",
            "fix the URI, or set tracking.enabled = false",
        ),
        replace=((OPEN_TRACKING, '[tracking]\nuri = "http://127.0.0.1:@PORT"'),),
        names_file=False,  # it names the key, folder or option instead
    ),
    "unreachable-postgresql": Case(
        (
            "cannot open the Optuna storage 'postgresql://u:***@127.0.0.1:@PORT/db' "
            "(search.storage in @FILE)",
            "Connection refused; check the URL and that the database server runs",
        ),
        args=("check", "@FILE"),
        replace=(
            ("[search]", '[search]\nstorage = "postgresql://u:pw-s3cret@127.0.0.1:@PORT/db"'),
        ),
        hidden="pw-s3cret",
    ),
    "report-before-study": Case(
        (
            "no study 'tiny/mlp' in sqlite:///@TMP/runs/tiny/optuna.db",
            "run `workbench study @FILE` first",
        ),
        args=("report", "@FILE"),
    ),
    "ensemble-before-study": Case(
        (
            "no study 'tiny/mlp' in sqlite:///@TMP/runs/tiny/optuna.db",
            "run `workbench study @FILE` first",
        ),
        args=("ensemble", "@FILE"),
    ),
    "worker-before-study": Case(
        (
            "no study 'tiny/mlp' in sqlite:///@TMP/runs/tiny/optuna.db",
            "run `workbench study @FILE` first",
        ),
        args=("worker", "@FILE"),
    ),
    "predict-before-study": Case(
        ("no final model in @TMP/runs/tiny/ensemble/final: run `workbench study @FILE` first",),
        args=("predict", "@FILE", "@TMP/x.png"),
    ),
    "predict-unknown-registered-model": Case(
        (
            "--model models:/nope@champion: no model there in the MLflow store "
            "sqlite:///@TMP/mlflow.db (Registered Model with name=nope not found); pass "
            "runs:/<run id>/model, models:/<name>@<alias>, models:/<name>/<version> or a final "
            "model folder",
        ),
        args=("predict", "@FILE", "@TMP/x.png", "--model", "models:/nope@champion"),
        replace=((OPEN_TRACKING, '[tracking]\nuri = "sqlite:///@TMP/mlflow.db"'),),
        names_file=False,  # it names the key, folder or option instead
    ),
    "export-before-study": Case(
        (
            "no study 'tiny/mlp' in sqlite:///@TMP/runs/tiny/optuna.db",
            "run `workbench study @FILE`",
        ),
        args=("export", "@FILE", "--onnx", "@TMP/model.onnx"),
    ),
    "empty-class-folder": Case(
        ("class folder @TMP/photos/c holds no image files",),
        extra='[data]\nsource = "folder"\npath = "@TMP/photos"\n',
        setup=lambda t: photos(t / "photos", {"a": 6, "b": 6, "c": 0}),
        names_file=False,  # it names the key, folder or option instead
    ),
    "single-class-folder": Case(
        ("image folder @TMP/photos has 1 class subfolder(s) ['a']; a classifier needs >= 2",),
        extra='[data]\nsource = "folder"\npath = "@TMP/photos"\n',
        setup=lambda t: photos(t / "photos", {"a": 6}),
        names_file=False,  # it names the key, folder or option instead
    ),
    "space-range-to-inf": Case(
        (
            "models.mlp.space.lr.high: inf is not a finite number; give a number (TOML's inf "
            "and nan are refused)",
        ),
        replace=(
            (
                "lr = { low = 1e-3, high = 3e-2, log = true }",
                "lr = { low = 1e-4, high = inf, log = true }",
            ),
        ),
    ),
    "choice-nan": Case(
        ("models.mlp.space.dropout.choices.1: nan is not a finite number",),
        replace=(("dropout = { low = 0.0, high = 0.3 }", "dropout = { choices = [0.1, nan] }"),),
    ),
    "train-key-minus-inf": Case(
        ("train.weight_decay: -inf is not a finite number",),
        replace=(("[train]\n", "[train]\nweight_decay = -inf\n"),),
    ),
    "data-path-is-a-file": Case(
        (
            "data.path '@TMP/plain.txt' is a file, but data.source = 'folder' reads a folder "
            "with one subfolder of images per class, or train/ and test/ of them; point "
            "data.path (or --data) at that folder",
        ),
        extra='[data]\nsource = "folder"\npath = "@TMP/plain.txt"\n',
        setup=lambda t: (t / "plain.txt").write_text("not a folder\n"),
        names_file=False,  # it names the key, folder or option instead
    ),
    "folder-without-class-folders": Case(
        (
            "image folder @TMP/photos/a holds 6 image file(s) but no class subfolders; "
            "data.source = 'folder' reads one subfolder of images per class "
            "(@TMP/photos/a/<class>/<image>)",
        ),
        extra='[data]\nsource = "folder"\npath = "@TMP/photos/a"\n',
        setup=lambda t: photos(t / "photos", {"a": 6}),
        names_file=False,  # it names the key, folder or option instead
    ),
    "output-dir-cannot-be-created": Case(
        (
            "@FILE: output_dir = '/proc/nope': the output folder /proc/nope/tiny cannot be "
            "created or written: /proc refuses new folders (No such file or directory); set "
            "output_dir to a writable folder",
        ),
        replace=(("@TMP/runs", "/proc/nope"),),
    ),
    "store-larger-than-the-disk": Case(
        (
            "the image store of data.path @TMP/photos is 9.4 MB (12 images x 3 channel(s) x 512 "
            "x 512 pixels, one byte each) and needs 18.9 MB while its photos are decoded, but "
            "the disk of @TMP/runs/tiny/images has",
            "lower data.image_size (now 512 x 512), use a subset of the images, or set "
            "output_dir to a folder on a disk with more room",
        ),
        extra='[data]\nsource = "folder"\npath = "@TMP/photos"\nimage_size = 512\n',
        setup=lambda t: photos(t / "photos", {"a": 6, "b": 6}),
        names_file=False,  # it names the key, folder or option instead
        disk=24 * 2**20,  # 24 MiB: room for the reserve (16 MiB) and a few MB, not 18.9
    ),
    "predict-table-not-csv-or-parquet": Case(
        (
            "--out @TMP/predictions.xlsx: the name must end in .csv or .parquet (the formats "
            "it writes); got '.xlsx'",
        ),
        args=("predict", "@FILE", "@TMP/x.png", "--out", "@TMP/predictions.xlsx"),
        names_file=False,  # it names the key, folder or option instead
    ),
    "predict-table-is-a-folder": Case(
        ("--out @TMP/table.csv is a folder; name a file, in it or elsewhere",),
        args=("predict", "@FILE", "@TMP/x.png", "--out", "@TMP/table.csv"),
        setup=lambda t: (t / "table.csv").mkdir(),
        names_file=False,  # it names the key, folder or option instead
    ),
    "table-without-the-label-column": Case(
        (
            "table @TMP/t/labels.csv has no column 'diagnosis' (data.columns.label); did you "
            "mean 'diagnoses'? its columns: 'file', 'diagnoses', 'patient'",
        ),
        extra=TABLE + 'columns = { path = "file", label = "diagnosis" }\n',
        setup=lambda t: table(t / "t", patients(8), header="file,diagnoses,patient"),
        names_file=False,  # it names the table and the key
    ),
    "table-names-a-missing-file": Case(
        (
            "table @TMP/t/labels.csv, line 26: image file @TMP/t/img/missing.png does not exist "
            "(1 of 25 listed files are missing; paths are relative to the table's folder, with "
            "data.suffix '.png')",
            'or set data.on_bad_file = "skip" to leave such rows out',
        ),
        extra=TABLE + TABLE_COLUMNS,
        setup=lambda t: table(t / "t", [*patients(8), ("missing", "a", "P9")]),
        names_file=False,
    ),
    "table-lists-a-file-twice": Case(
        ("table @TMP/t/labels.csv lists the image @TMP/t/img/0-0.png twice, on lines 2 and 26",),
        extra=TABLE + TABLE_COLUMNS,
        setup=lambda t: table(t / "t", [*patients(8), ("0-0", "b", "P0")]),
        names_file=False,
    ),
    "table-row-without-a-label": Case(
        (
            "table @TMP/t/labels.csv: 1 row(s) have no label in column 'dx' "
            "(data.columns.label), the first on line 5",
        ),
        extra=TABLE + TABLE_COLUMNS,
        setup=lambda t: table(
            t / "t", [(n, "" if n == "1-0" else y, g) for n, y, g in patients(8)]
        ),
        names_file=False,
    ),
    "table-path-is-a-folder": Case(
        (
            "data.path '@TMP/t' is a folder, but data.source = 'table' reads a .csv or .parquet "
            "file",
        ),
        extra='[data]\nsource = "table"\npath = "@TMP/t"\n',
        setup=lambda t: (t / "t").mkdir(),
        names_file=False,
    ),
    "table-columns-on-a-folder-source": Case(
        ("data: `columns` applies to data.source = 'table'",),
        extra='[data]\nsource = "folder"\npath = "@TMP/photos"\ncolumns = { label = "dx" }\n',
    ),
    "group-column-with-an-empty-cell": Case(
        (
            "group column 'patient' (cv.group_by) is empty in 1 row(s) of table:@TMP/t/labels.csv "
            "(24 images), the first for img/2-1",
        ),
        extra=TABLE + TABLE_COLUMNS,
        replace=GROUPED,
        setup=lambda t: table(
            t / "t", [(n, y, "" if n == "2-1" else g) for n, y, g in patients(8)]
        ),
        names_file=False,
    ),
    "a-single-group": Case(
        (
            "cv.group_by = 'patient' puts every row of table:@TMP/t/labels.csv (24 images) in one "
            "group ('P0'); grouped splits need >= 4 groups",
        ),
        extra=TABLE + TABLE_COLUMNS,
        replace=GROUPED,
        setup=lambda t: table(t / "t", [(n, y, "P0") for n, y, _ in patients(8)]),
        names_file=False,
    ),
    "fewer-groups-than-folds": Case(
        (
            "cv.group_by = 'patient' gives 3 groups, fewer than the held-out split and "
            "cv.folds = 3 folds need (4: every side at least one); lower cv.folds, or group "
            "more finely",
        ),
        extra=TABLE + TABLE_COLUMNS,
        replace=GROUPED,
        setup=lambda t: table(t / "t", patients(3, per=8, label=lambda p: "ab"[p % 2])),
        names_file=False,
    ),
    "a-class-in-a-single-group": Case(
        (
            "class 'b' lives in a single group ('P1' of cv.group_by = 'patient'), so it cannot "
            "be in both the training and the test rows",
        ),
        extra=TABLE + TABLE_COLUMNS,
        replace=GROUPED,
        setup=lambda t: table(t / "t", patients(8, label=lambda p: "b" if p == 1 else "a")),
        names_file=False,
    ),
    "group-by-on-the-digits": Case(
        (
            "cv.group_by = 'patient' names the groups of a table's rows (a column) or of an "
            "image folder's files (a pattern on their names), but data.source = 'digits' has "
            "neither; remove cv.group_by",
        ),
        replace=GROUPED,
    ),
    "group-by-not-a-pattern": Case(
        (
            "cv.group_by: '^(P[0-9]+_' is not a regular expression (missing ), unterminated "
            "subpattern",
        ),
        extra='[data]\nsource = "folder"\npath = "@TMP/photos"\n',
        replace=(("folds = 3", "folds = 3\ngroup_by = '^(P[0-9]+_'"),),
    ),
    "split-folders-with-other-classes": Case(
        (
            "the split folders of @TMP/photos must hold the same class folders, but test/ lacks "
            "['b'] and has ['c'], which train/ lacks; train/ holds ['a', 'b']",
        ),
        extra='[data]\nsource = "folder"\npath = "@TMP/photos"\n',
        setup=lambda t: (
            photos(t / "photos" / "train", {"a": 6, "b": 6}),
            photos(t / "photos" / "test", {"a": 3, "c": 3}),
        ),
        names_file=False,
    ),
    "split-names-as-classes": Case(
        (
            "image folder @TMP/photos's subfolders test/, train/ are split names, so workbench "
            "reads them as split folders, each holding one subfolder of images per class "
            "(@TMP/photos/test/<class>/<image>); but @TMP/photos/test holds 6 image file(s) and "
            "no class folders",
            "if test, train are your classes, rename those folders",
        ),
        extra='[data]\nsource = "folder"\npath = "@TMP/photos"\n',
        setup=lambda t: photos(t / "photos", {"train": 6, "test": 6}),
        names_file=False,
    ),
    "budget-not-a-duration": Case(
        (
            "search.budget: a duration like '30m', '2h', '1h30m' or '90s' (or a number of "
            "seconds) must be given, not '5min'",
        ),
        args=("study", "@FILE", "--budget", "5min"),
    ),
    "study-file-missing": Case(
        ("@TMP/nope.toml: study file not found",),
        args=("study", "@TMP/nope.toml"),
        names_file=False,  # it names the key, folder or option instead
    ),
    "trials-0": Case(
        ("Invalid value for '--trials': Input should be greater than or equal to 1",),
        args=("study", "@FILE", "--trials", "0"),
        ours=False,
        names_file=False,  # it names the key, folder or option instead
    ),
}


def sub(text: str, tmp: Path, port: int, file: Path) -> str:
    return text.replace("@TMP", str(tmp)).replace("@PORT", str(port)).replace("@FILE", str(file))


PARAMS = [
    pytest.param(
        name,
        id=name,
        marks=[pytest.mark.xfail(reason=case.known_bug, strict=True)] if case.known_bug else [],
    )
    for name, case in CASES.items()
]


@dataclass(frozen=True)
class Ran:
    """One case run: the CLI's result and the output folder's tree before and after."""

    result: subprocess.CompletedProcess[str]
    file: Path
    tmp: Path
    port: int
    before: dict[str, str]
    after: dict[str, str]


def run_case(case: Case, tmp: Path) -> Ran:
    tmp.mkdir(parents=True)
    port = free_port()  # nothing listens there
    file = tmp / "tiny.toml"
    text = TINY.format(out=tmp / "runs")
    for old, new in case.replace:
        old = sub(old, tmp, port, file)
        assert old in text, f"{old!r} is not in the tiny study"
        text = text.replace(old, sub(new, tmp, port, file))
    file.write_text(sub(case.top + "\n" + text + "\n" + case.extra, tmp, port, file))
    runs = tmp / "runs"
    with small_disk(runs, case.disk) if case.disk else nullcontext(runs):
        (runs / "tiny").mkdir(parents=True)
        (runs / "tiny" / "notes.txt").write_text("left from an earlier run\n")
        if case.setup:
            case.setup(tmp)
        before = tree(runs)
        result = run_cli(
            *(sub(a, tmp, port, file) for a in case.args), cwd=tmp, env={**CLI_ENV, **case.env}
        )
        return Ran(result, file, tmp, port, before, tree(runs))


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Future[Ran]]:
    """Every case, run three at a time: each is a fresh interpreter (~5 s, mostly imports and
    the 3 s connection timeouts), so the table takes ~1 min on 2 cores instead of ~2.5. A case
    that cannot be set up (a tmpfs without root) fails its own test, not the table's."""
    root = tmp_path_factory.mktemp("bad-inputs")
    with ThreadPoolExecutor(3) as pool:
        futures = {name: pool.submit(run_case, case, root / name) for name, case in CASES.items()}
    return futures


@pytest.mark.parametrize("name", PARAMS)
def test_a_bad_input_is_exit_2_one_clear_message_and_changes_nothing(
    ran: dict[str, Future[Ran]], name: str
) -> None:
    case, r = CASES[name], ran[name].result()
    output = r.result.stdout + r.result.stderr
    assert r.result.returncode == 2, output
    assert "Traceback" not in output
    if case.ours:
        assert output.startswith("error: "), output
        if "error(s) in the study file" not in output:  # a load error: one indented line a key
            assert len([line for line in output.splitlines() if line.strip()]) == 1, output
    flat = " ".join(output.split())
    for fragment in case.fragments:
        assert sub(fragment, r.tmp, r.port, r.file) in flat, output
    if case.names_file:
        assert str(r.file) in flat, output
    if case.hidden:
        assert case.hidden not in output
    assert r.after == r.before
