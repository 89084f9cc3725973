"""Seeds, device, threads and the process's memory: set here and nowhere else.

Measured on the 2-core CI machine: a small CNN with 2 torch threads is 1.3-1.6x faster than with 1
when idle, but up to 8x slower when anything runs beside it; two single-thread processes give ~2x
one. So every worker process runs one torch thread, and there is one worker per core.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

FORK = sys.platform == "linux"  # macOS frameworks and Windows do not allow fork after imports
S = TypeVar("S")  # what every item shares
T = TypeVar("T")  # an item
R = TypeVar("R")  # a result


def configure_threads(threads: int = 1) -> None:
    """One intra-op thread per worker process (and one inter-op thread, where still settable)."""
    torch.set_num_threads(threads)
    # inter-op threads can be set only once per process, before any parallel work
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(threads)


@contextlib.contextmanager
def all_cores() -> Iterator[int]:
    """Intra-op threads on every core this process may use, for work a stage runs alone (the
    distilled student's training); the earlier count is restored after. Yields the count."""
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(cores or 1)
    try:
        yield cores or 1
    finally:
        torch.set_num_threads(before)


def forked_map(
    fn: Callable[[S, T], R], shared: S, items: Sequence[T], workers: int = 1
) -> Generator[R, None, None]:
    """`fn(shared, item)` for each item, in order, yielded as each is ready: on Linux in
    `workers` processes forked now, each of one torch thread and keeping the memory it frees
    (`keep_freed_memory`); with 0 workers, or elsewhere, in this process (0: for work on a CUDA
    device, whose context a fork does not carry). One worker is a forked process too, so this
    process's heap does not grow by the work. `shared` (an image store's rows, a model) reaches
    the workers by the fork, never pickled; each item and each result is pickled. Work that is
    the same on one thread in any process gives the same results bit for bit whatever the
    count. Each result waits in this process until it is taken: take them as they come.
    Measured here: forking two workers from a process that holds what the ensemble stage
    imports (torch, scikit-learn, onnxruntime), and ending them, costs 0.05 s."""
    n = min(workers, len(items))
    if not FORK or n == 0:
        yield from (fn(shared, item) for item in items)
        return
    ctx = get_context("fork")
    pool = ProcessPoolExecutor(n, mp_context=ctx, initializer=_enter, initargs=(fn, shared))
    try:
        yield from pool.map(_call, items)
    finally:  # an error or Ctrl-C here: the items not started are dropped, not run
        pool.shutdown(wait=True, cancel_futures=True)


_TASK: tuple[Callable[[Any, Any], Any], Any] | None = None  # in a forked worker: (fn, shared)


def _enter(fn: Callable[[Any, Any], Any], shared: Any) -> None:
    """A forked worker's start: one torch thread, freed memory kept for the next item; Ctrl-C
    is the parent's to handle (it drops the items not started); the collector leaves the
    parent's objects alone, so their pages stay shared rather than copied by a collection's
    walk."""
    global _TASK
    configure_threads(1)
    keep_freed_memory()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gc.freeze()
    _TASK = (fn, shared)


def _call(item: Any) -> Any:
    assert _TASK is not None, "a forked_map worker runs items only after _enter"
    fn, shared = _TASK
    return fn(shared, item)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator for batch order and augmentation."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def derive_seed(*parts: int | str) -> int:
    """A stable 31-bit seed from a study seed and names/numbers (e.g. seed, model, trial, fold)."""
    import hashlib

    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def gpu_count() -> int:
    """CUDA devices visible. torch counts them through NVML where it can, which leaves CUDA
    uninitialised: the parent may still fork its workers after asking."""
    return torch.cuda.device_count() if torch.backends.cuda.is_built() else 0


def select_device(name: str = "auto", worker: int = 0) -> torch.device:
    """'auto' picks a GPU when there is one, else the CPU; worker i gets GPU i mod the number of
    GPUs, so several workers per GPU share them evenly. 'cuda' without a GPU is an error."""
    gpus = gpu_count() if name != "cpu" else 0
    if name == "cuda" and gpus == 0:
        raise RuntimeError("device = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(f"cuda:{worker % gpus}") if gpus else torch.device("cpu")


def default_workers(device: str = "auto", per_gpu: int = 1) -> int:
    """One worker per core the process may use; with GPUs, `per_gpu` workers on each."""
    gpus = gpu_count() if device != "cpu" else 0
    if gpus:
        return gpus * per_gpu
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def skip_triton_without_gpu() -> None:
    """Without a visible GPU, make `import triton` fail (None in sys.modules), as if it were not
    installed: torch._dynamo, which torchvision and every optimizer import, loads Triton's 500 MB
    library when the package is present, and Triton compiles GPU kernels only. Measured here: +75
    MB of proportional set size in the process that imports it (70 MB of it the library's pages,
    counted whole in the parent, as workers never touch them). torch checks for Triton with
    `import triton` / `find_spec` and treats both errors as absent. Call it before anything
    imports torch._dynamo; a no-op once Triton is imported, or where a GPU is visible."""
    if "triton" not in sys.modules and gpu_count() == 0:
        sys.modules["triton"] = None  # type: ignore[assignment]
        # torch.utils.flop_counter (imported by the ONNX export of the ensemble stage) then
        # warns "triton not found" on a CUDA build: true, and made so on purpose here
        logging.getLogger("torch.utils.flop_counter").addFilter(_NoTritonWarning())


class _NoTritonWarning(logging.Filter):
    """Drops only torch's warning that Triton is absent; the logger's other records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("triton not found")


def available_memory() -> int:
    """Bytes of memory this machine can give a process without swapping: Linux's MemAvailable
    (free memory plus the page cache and slabs it can reclaim), else the free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


HOLD = "WORKBENCH_TEST_HOLD"  # tests only: "<run>/<fold>:<file>", run a trial number or *


def hold_point(run: int | str, fold: int) -> None:
    """A test's hold on a worker: with WORKBENCH_TEST_HOLD = "<run>/<fold>:<file>", the process
    stops before it trains fold <fold> of run <run> (a trial number, or * for any run), writes
    <file>.held (its pid) and waits until <file> exists. A test that kills or freezes a worker
    "during fold k", or fills its disk there, does it while the worker waits: on any machine,
    under any load. Unset (always, outside tests), it returns at once."""
    spec = os.environ.get(HOLD)
    if not spec:
        return
    at, _, path = spec.partition(":")
    want_run, _, want_fold = at.partition("/")
    if want_fold != str(fold) or want_run not in ("*", str(run)):
        return
    go = Path(path)
    held = go.with_name(go.name + ".held")
    tmp = held.with_name(held.name + ".tmp")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, held)  # whole or absent: the test reads the pid
    while not go.exists():
        time.sleep(0.05)


def trim_memory() -> None:
    """Give freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere).

    glibc keeps the blocks of freed tensors (its mmap threshold grows after a large free), so a
    worker's memory stays at its largest evaluation batch. Measured here, a 3,333-row fold of
    32x32 RGB: +273 MB after `fit`, +163 MB once trimmed; a trim costs ~1 ms. Forcing a fixed
    mmap threshold instead (mallopt) made training 1.7x slower."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def keep_freed_memory() -> None:
    """Let glibc keep what this process frees for its next allocation (a no-op elsewhere): for
    a process that lives for one task of like batches, a forked_map worker predicting rows.

    By default glibc gives large freed blocks back to the kernel (those above its mmap
    threshold, and the heap's top above its trim threshold), and the next batch faults them in
    again. Measured here, a resnet (depth 10, width 16) over 8,000 28x28 rows, batches of 128:
    3.6-3.9 s, 1.0-1.4 s of it in the kernel; with blocks up to 256 MB kept in the heap and the
    heap never trimmed below 1 GB, 2.3-2.6 s, 0.01 s in the kernel (each setting alone: 4.7 and
    7.3 s); bench item 13's 72 fold models, 140 s and 101 s. A process whose own large frees
    have raised glibc's threshold already gains little (the `ensemble` command's: 107 s in it,
    108 s in one forked worker). The process holds its largest batch's memory until it ends."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 256 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


MADV_DONTNEED = 4  # Linux's value on every architecture


def release_file_pages() -> int:
    """Unmap this process's resident pages of read-only private file mappings (libraries' code
    and constant data) that hold no copied-on-write page; returns the bytes unmapped (Linux only,
    0 elsewhere). Pages still in use map again from the page cache on their next touch (a minor
    fault); the rest stay unmapped, as the kernel leaves clean file pages it reclaims.

    Why: the dynamic loader and the libraries' static constructors touch pages that nothing
    touches again. On the CUDA build of torch with no GPU, `import torch` maps 141 MB of the CUDA
    libraries this way (libcublasLt alone 56 MB), and a parent that forks its workers shares them
    with every worker. Measured on bench item 7: 253 MB unmapped in the parent before the fork,
    the workers' file pages back to what they run (24 MB each beside the store), and the study's
    peak PSS from 1,037 to 961 MB. A mapping with any copied page (relocated data) is left
    whole: dropping it would restore the file's bytes; one that is writable is never touched."""
    libc = _glibc()
    if libc is None:
        return 0
    released = 0
    for start, end, rss in _clean_file_mappings():
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED) == 0:
            released += rss
    return released


def _clean_file_mappings() -> list[tuple[int, int, int]]:
    """(start, end, resident bytes) of each private, non-writable file mapping with resident pages
    and no anonymous (copied) page."""
    found = []
    for head, kb in _smaps():
        perms, path = head[1], head[5] if len(head) > 5 else ""
        private_read_only = perms[1] == "-" and perms[3] == "p"
        if path.startswith("/") and private_read_only and kb["Rss"] and not kb["Anonymous"]:
            start, end = (int(v, 16) for v in head[0].split("-"))
            found.append((start, end, kb["Rss"] * 1024))
    return found


def _smaps() -> Iterator[tuple[list[str], dict[str, int]]]:
    """Each mapping in /proc/self/smaps: its header ("start-end perms offset dev inode path"),
    split, and its sizes in kB ("Rss", "Anonymous", ...)."""
    head: list[str] = []
    kb: dict[str, int] = {}
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if not parts[0].endswith(":"):
            if head:
                yield head, kb
            head, kb = parts, {}
        elif parts[-1] == "kB":
            kb[parts[0][:-1]] = int(parts[1])
    if head:
        yield head, kb


@functools.cache
def _glibc() -> Any:
    """ctypes handle of glibc; None where there is none."""
    import ctypes.util

    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name and os.uname().sysname == "Linux" else None
