"""Item 1: images/second of workbench's `fit` on one fold versus the bare loop (bare_loop.py).

Same tensors, model, initial weights, optimizer (AdamW), schedule (one-cycle), batch size, epochs
and thread count; workbench with augmentation off and its per-epoch validation on a small val set
(inside the timed call). The loops alternate, their order rotating each round; the figure is the
median over rounds of the ratio. A third loop, the bare one with channels_last, is a reference.
"""

from __future__ import annotations

import copy
import cProfile
import io
import pstats
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile

from bench.bare_loop import bare_fit
from bench.common import MNIST_T10K, Figure, ItemResult, at_least, median, spread, timed
from workbench.config import DataConfig, TrainConfig
from workbench.data import channel_stats, cv_folds, load_data, make_split
from workbench.models import Classifier, create_model
from workbench.train import fit

TARGET = 0.9  # workbench >= 0.9x the bare loop's images/second
BATCH = 64  # images per optimizer step (digits.toml's batch_size)
LR, WEIGHT_DECAY = 3e-3, 5e-4  # peak lr and AdamW decay: TrainConfig's defaults


Rows = tuple[torch.Tensor, torch.Tensor]  # images (N, C, H, W) in [0, 1], labels (N,)


def _shape(x: torch.Tensor) -> tuple[int, int, int]:
    c, h, w = x.shape[1:]
    return (c, h, w)


@dataclass
class Case:
    """One training task: tensors and a CNN (width 16, depth 2), started from fixed weights."""

    label: str
    source: str  # where the images came from
    train: Rows
    val: Rows
    epochs: int
    repeats: int  # timed rounds, one run of each loop per round
    init: dict[str, torch.Tensor]  # the initial state dict both loops start from

    def model(self) -> Classifier:
        x = self.train[0]
        net = create_model("cnn", 10, _shape(x), *channel_stats(x), width=16, depth=2)
        net.load_state_dict(copy.deepcopy(self.init))
        return net

    @property
    def images(self) -> int:  # trained per run (ragged last batch dropped, as both loops do)
        return self.epochs * (len(self.train[0]) // BATCH) * BATCH


def _case(label: str, source: str, train: Rows, val: Rows, epochs: int, repeats: int) -> Case:
    torch.manual_seed(0)
    x = train[0]
    net = create_model("cnn", 10, _shape(x), *channel_stats(x), width=16, depth=2)
    return Case(label, source, train, val, epochs, repeats, copy.deepcopy(net.state_dict()))


def mnist_case(quick: bool) -> Case:
    """28x28: the first rows of the 10k MNIST test images (random pixels if they are absent)."""
    n_train, n_val = (512, 128) if quick else (4000, 256)  # images
    if MNIST_T10K.exists():
        d = load_data(DataConfig(source="idx"), str(MNIST_T10K))
        x, y, source = d.images(), d.y, "MNIST t10k (../shared/data/mnist-t10k)"
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(n_train + n_val, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (n_train + n_val,), generator=g)
        source = "random 28x28 pixels (MNIST t10k not found)"
    train = (x[:n_train], y[:n_train])
    val = (x[n_train : n_train + n_val], y[n_train : n_train + n_val])
    return _case("28x28", source, train, val, epochs=1 if quick else 3, repeats=2 if quick else 3)


def digits_case(quick: bool) -> Case:
    """8x8: fold 0 of the digits study (80/20 split, 5 folds, seed 0): 1,149 train, 288 val."""
    d = load_data(DataConfig())
    split = make_split(d, DataConfig(), seed=0)
    x, y = d.images(split.train_idx), d.y[split.train_idx]
    tr, va = cv_folds(y.numpy(), 5, 0)[0]
    tr = tr[:512] if quick else tr
    return _case(
        "8x8 digits",
        "scikit-learn digits, fold 0 of 5",
        (x[tr], y[tr]),
        (x[va], y[va]),
        epochs=2 if quick else 10,
        repeats=2 if quick else 5,
    )


def run_bare(case: Case, channels_last: bool = False) -> float:
    """Seconds of one bare-loop run."""
    model = case.model()
    gen = torch.Generator().manual_seed(0)
    x, y = case.train
    seconds, _ = timed(
        lambda: bare_fit(
            model,
            x,
            y,
            epochs=case.epochs,
            batch_size=BATCH,
            lr=LR,
            weight_decay=WEIGHT_DECAY,
            generator=gen,
            channels_last=channels_last,
        )
    )
    return seconds


def run_workbench(case: Case) -> tuple[float, float]:
    """Seconds of one `fit` call (validation included), and fit's own train-only images/s."""
    model = case.model()
    cfg = TrainConfig(
        epochs=case.epochs,
        batch_size=BATCH,
        optimizer="adamw",
        schedule="onecycle",
        lr=LR,
        weight_decay=WEIGHT_DECAY,
    )
    gen = torch.Generator().manual_seed(0)
    seconds, result = timed(
        lambda: fit(model, case.train, case.val, cfg, augment=None, generator=gen)
    )
    return seconds, result.images_per_second


LOOPS = ("bare", "workbench", "bare_cl")  # bare_cl: the bare loop with channels_last (reference)


def measure(case: Case) -> dict[str, Any]:
    """Warm up every loop, then time `repeats` rounds, the loops' order rotating each round."""
    head = (case.train[0][:512], case.train[1][:512])  # 2 epochs of 8 steps: one-cycle needs >= 8
    warm = Case(case.label, case.source, head, case.val, 2, 0, case.init)
    for channels_last in (False, True):
        run_bare(warm, channels_last)
    run_workbench(warm)
    seconds: dict[str, list[float]] = {loop: [] for loop in LOOPS}
    train_only: list[float] = []  # fit's own images/s, training steps only
    for rep in range(case.repeats):
        for loop in LOOPS[rep % 3 :] + LOOPS[: rep % 3]:
            if loop == "workbench":
                s, ips = run_workbench(case)
                train_only.append(ips)
            else:
                s = run_bare(case, channels_last=loop == "bare_cl")
            seconds[loop].append(s)
    # per round: workbench img/s over a bare loop's img/s = bare seconds / workbench seconds
    ratios = [b / w for b, w in zip(seconds["bare"], seconds["workbench"], strict=True)]
    ratios_cl = [b / w for b, w in zip(seconds["bare_cl"], seconds["workbench"], strict=True)]
    return {
        "images_per_run": case.images,
        "seconds": seconds,
        "pair_ratios": ratios,
        "images_per_s": {loop: case.images / median(s) for loop, s in seconds.items()},
        "workbench_train_only_images_per_s": median(train_only),
        "ratio": median(ratios),
        "ratio_vs_channels_last": median(ratios_cl),
    }


def run(quick: bool, machine_tag: str) -> ItemResult:
    torch.set_num_threads(1)
    result = ItemResult(
        1,
        "Training-loop overhead: workbench.train.fit vs a bare PyTorch loop",
        machine_tag,
        [
            f"cnn width 16 depth 2, AdamW (lr {LR}, wd {WEIGHT_DECAY}), one-cycle, batch {BATCH}, "
            "1 torch thread, same initial weights and tensors for every loop",
            "workbench: augmentation off, per-epoch validation inside the timed call, "
            "channels_last (its own choice); bare: bench/bare_loop.py (NCHW)",
            "img/s = trained images / wall seconds of the call; ratio = median over rounds of "
            "workbench img/s / bare img/s (loops alternate within a round)",
            "reference row, no target: the bare loop with channels_last, to tell the loop's "
            "own cost from the memory format's gain",
        ],
    )
    for case in (mnist_case(quick), digits_case(quick)):
        m = measure(case)
        ips = m["images_per_s"]
        n_tr, n_va = len(case.train[0]), len(case.val[0])
        result.setup.append(
            f"{case.label}: {case.source}: {n_tr} train / {n_va} val rows, {case.epochs} epochs, "
            f"{case.repeats} rounds"
        )
        train_only = m["workbench_train_only_images_per_s"]
        result.figures += [
            Figure(f"{case.label} bare loop", ips["bare"], "img/s"),
            Figure(
                f"{case.label} workbench fit",
                ips["workbench"],
                "img/s",
                note=f"training steps only (fit's own count): {train_only:,.0f} img/s",
            ),
            at_least(
                f"{case.label} workbench / bare",
                m["ratio"],
                TARGET,
                note=f"per round: {spread(m['pair_ratios'])}",
            ),
            Figure(
                f"{case.label} workbench / bare channels_last",
                m["ratio_vs_channels_last"],
                "x",
                note=f"reference: bare + channels_last {ips['bare_cl']:,.0f} img/s",
            ),
        ]
        result.details[case.label] = m
    return result


# --- --profile ---------------------------------------------------------------------------------


def write_profile(quick: bool, path: Path, machine_tag: str, top: int = 25) -> Path:
    """cProfile and torch.profiler over one workbench fit and one bare run of each case."""
    torch.set_num_threads(1)
    parts = [
        f"item 1's loops profiled ({machine_tag}); sizes as in {'--quick' if quick else 'the'} "
        "run; each loop warmed up once, then profiled on its own (not the timed runs)\n\n"
    ]
    for case in (mnist_case(quick), digits_case(quick)):
        for name, call in (("workbench fit", run_workbench), ("bare loop", run_bare)):
            call(case)  # warm-up
            prof = cProfile.Profile()
            prof.enable()
            call(case)
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
            parts.append(f"=== {case.label}, {name}: cProfile, top {top} by own time ===\n")
            parts.append(buf.getvalue())
            with torch_profile(activities=[ProfilerActivity.CPU]) as tp:
                call(case)
            table = tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
            parts.append(f"=== {case.label}, {name}: torch.profiler, top {top} by self CPU ===\n")
            parts.append(table + "\n\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts))
    return path
