"""`make bench`: workbench's overheads and accuracy, each measured beside its floor in one run.

    1 training loop    workbench.train.fit vs a bare PyTorch loop (img/s)      >= 0.9x
    2 tracking         search stage with MLflow on vs off                      <= 5 %
    3 parallelism      trials/hour, 2 workers vs 1                             >= 1.8x
    4 end to end       wall time per stage of the digits study (--trials 3)
    5 inference        logged pyfunc model vs the bare final module (img/s)    >= 0.9x
    6 accuracy         final model vs RBF SVC / logistic regression, same split
    7 store memory     2-worker study on 50,000 32x32 RGB PNGs, PSS summed      <= 1 GB
    8 store loading    10,000 mixed-size JPEGs into the store; reopened  >= 1,000 img/s; < 2 s
    9 store training   fit on uint8 store rows vs float tensors, 28x28          >= 0.95x
   10 ONNX             the final model: onnxruntime vs torch eager (img/s), 1 thread and all cores
   11 predict          `workbench predict` on 10,000 PNG files: img/s, share decoding
   12 ladder           one network to the shipped ensemble on MNIST and photos made from it
   13 ensemble stage   its wall time on MNIST (18 members, 8,000 test rows), 2 workers vs 1 >= 1.7x;
                       its cost per member and per test row
   14 time to quality  hyperband vs median on digits and MNIST: time to the median's best CV >= 2x,
                       final test log loss no worse within its CI
   15 budget           `--budget` 5, 10 and 20 min on digits: wall time over the budget   <= 10 %

python bench/run.py [--quick] [--full] [--profile] [--only N[,N]] [--out DIR] [--keep]
Writes <out>/bench.json and bench.md (default reports/bench/). Studies run in a temp folder.
Exit status 1 if an item failed to run; a missed target is reported, not an error.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/run.py` from anywhere

from rich.console import Console

from bench import (
    accuracy,
    budget,
    end_to_end,
    ensemble_stage,
    images,
    inference,
    ladder,
    output,
    search_stage,
    training,
    use,
)
from bench.common import ROOT, ItemResult, StudyRun, machine, machine_tag
from workbench.runtime import configure_threads

console = Console()


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="shrink everything: ~1 min, noisy")
    p.add_argument("--full", action="store_true", help="item 4 runs digits and mnist in full")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile item 1's loops (cProfile, torch.profiler) into <out>/profile.txt",
    )
    p.add_argument(
        "--only",
        default="1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
        help="items to run, e.g. 1 or 2,3",
    )
    p.add_argument(
        "--budgets", default="", help="item 15's budgets in minutes, e.g. 5,10 (default 5,10,20)"
    )
    p.add_argument("--ttq", default="digits,mnist", help="item 14's studies: digits, mnist or both")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "bench", help="output folder")
    p.add_argument("--keep", action="store_true", help="keep the temp folder of the studies")
    args = p.parse_args(argv)
    args.items = sorted({int(n) for n in args.only.split(",")})
    if not set(args.items) <= set(ITEMS):
        p.error(f"--only takes items 1 to {max(ITEMS)}, got {args.only!r}")
    return args


class Context:
    """What items share: the temp folder, the small-study runs (2, 3), the digits study (4-6)."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args, self.tmp = args, tmp
        self.machine = machine()
        self.search_runs = search_stage.SearchRuns(tmp, args.quick)
        self.study: tuple[StudyRun, str, str] | None = None

    def tag(self, threads: str = "1 torch thread") -> str:
        return machine_tag(self.machine, threads)

    def digits(self) -> tuple[StudyRun, str, str]:
        """Item 4's digits study; run here if item 4 was not asked for."""
        if self.study is None:
            self.study = end_to_end.digits_study(self.tmp, self.args.quick, self.args.full)
        return self.study


def item_1(ctx: Context) -> ItemResult:
    return training.run(ctx.args.quick, ctx.tag())


def item_2(ctx: Context) -> ItemResult:
    return search_stage.tracking_overhead(ctx.search_runs, ctx.tag("1 torch thread per worker"))


def item_3(ctx: Context) -> ItemResult:
    return search_stage.parallel_efficiency(ctx.search_runs, ctx.tag("1 torch thread per worker"))


def item_4(ctx: Context) -> ItemResult:
    result, run = end_to_end.run(
        ctx.tmp, ctx.args.quick, ctx.args.full, ctx.tag("1 torch thread per worker")
    )
    ctx.study = (run, result.details["digits"]["label"], result.details["digits"]["how"])
    return result


def item_5(ctx: Context) -> ItemResult:
    run, _, how = ctx.digits()
    result = inference.run(run, ctx.args.quick, ctx.tag())
    result.setup.insert(0, f"the final model of item 4's digits study ({how})")
    return result


def item_6(ctx: Context) -> ItemResult:
    run, label, how = ctx.digits()
    result = accuracy.run(run.out, label, ctx.tag())
    result.setup.insert(0, f"{label}: item 4's digits study ({how})")
    return result


def item_7(ctx: Context) -> ItemResult:
    return images.memory(ctx.tmp, ctx.args.quick, ctx.tag("1 torch thread per worker"))


def item_8(ctx: Context) -> ItemResult:
    return images.loading(ctx.tmp, ctx.args.quick, ctx.tag("one decoding process per core"))


def item_9(ctx: Context) -> ItemResult:
    return images.training(ctx.args.quick, ctx.tag())


def item_10(ctx: Context) -> ItemResult:
    run, _, how = ctx.digits()
    result = use.onnx_vs_torch(run, ctx.args.quick, ctx.tag("1 thread and all cores"))
    result.setup.insert(0, f"the final model of item 4's digits study ({how})")
    return result


def item_11(ctx: Context) -> ItemResult:
    run, _, how = ctx.digits()
    result = use.predict_pngs(run, ctx.tmp, ctx.args.quick, ctx.tag())
    result.setup.insert(0, f"the final model of item 4's digits study ({how})")
    return result


def item_12(ctx: Context) -> ItemResult:
    return ladder.run(ctx.tmp, ctx.args.quick, ctx.tag("1 torch thread per worker"))


def item_13(ctx: Context) -> ItemResult:
    return ensemble_stage.run(ctx.tmp, ctx.args.quick, ctx.tag("1 torch thread per worker"))


def item_14(ctx: Context) -> ItemResult:
    studies = tuple(ctx.args.ttq.split(","))
    tag = ctx.tag("1 torch thread per worker")
    return budget.time_to_quality(ctx.tmp, ctx.args.quick, tag, studies)


def item_15(ctx: Context) -> ItemResult:
    minutes = tuple(int(m) for m in ctx.args.budgets.split(",")) if ctx.args.budgets else None
    tag = ctx.tag("1 torch thread per worker")
    return budget.budget_adherence(ctx.tmp, ctx.args.quick, tag, minutes)


ITEMS: dict[int, tuple[str, Callable[[Context], ItemResult]]] = {
    1: ("Training-loop overhead", item_1),
    2: ("Tracking overhead", item_2),
    3: ("Parallel efficiency", item_3),
    4: ("End to end", item_4),
    5: ("Ensemble inference", item_5),
    6: ("Accuracy beside references", item_6),
    7: ("Image store: memory", item_7),
    8: ("Image store: loading", item_8),
    9: ("Training from the store", item_9),
    10: ("The final model as ONNX", item_10),
    11: ("Predicting files", item_11),
    12: ("The ensemble ladder", item_12),
    13: ("The ensemble stage on every core", item_13),
    14: ("Time to quality: hyperband against the median pruner", item_14),
    15: ("The time budget on the digits study", item_15),
}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    configure_threads(1)
    mode = "full" if args.full else "quick" if args.quick else "default"
    tmp = Path(tempfile.mkdtemp(prefix="workbench-bench-"))
    ctx = Context(args, tmp)
    console.print(f"bench ({mode}), items {args.items}; studies in {tmp}")
    results: list[ItemResult] = []
    t_start = time.perf_counter()
    failed = False
    try:
        for n in args.items:
            title, fn = ITEMS[n]
            console.print(f"[bold]item {n}[/]: {title} ...")
            t0 = time.perf_counter()
            try:
                result = fn(ctx)
            except Exception as e:  # one failing item must not hide the others' results
                failed = True
                result = ItemResult(n, title, ctx.tag(), [], details={"error": _error(e)})
                console.print(f"[red]item {n} failed:[/] {e}")
            result.seconds = time.perf_counter() - t0
            results.append(result)
            console.print(f"item {n}: {result.seconds:.1f} s")
            _write(args, results, ctx, mode, time.perf_counter() - t_start)
        if args.profile:
            t0 = time.perf_counter()
            path = training.write_profile(args.quick, args.out / "profile.txt", ctx.tag())
            console.print(f"profile of item 1: {path} ({time.perf_counter() - t0:.1f} s)")
    finally:
        if args.keep:
            console.print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - t_start
    output.show(results, ctx.machine, mode)
    js, md = _write(args, results, ctx, mode, total)
    console.print(f"total {total:.0f} s; wrote {js} and {md}")
    return 1 if failed else 0


def _write(
    args: argparse.Namespace, results: list[ItemResult], ctx: Context, mode: str, total: float
) -> tuple[Path, Path]:
    extra = {"items_run": args.items, "loadavg_1min_at_end": round(os.getloadavg()[0], 2)}
    return output.write(args.out, results, ctx.machine, mode, total, extra)


def _error(e: Exception) -> str:
    return "".join(traceback.format_exception_only(e)).strip() + "\n" + traceback.format_exc()


if __name__ == "__main__":
    sys.exit(main())
