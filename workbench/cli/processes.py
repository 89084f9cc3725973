"""Worker processes: forked from `workbench study` where the OS allows, spawned elsewhere.

Forked (Linux): the parent has imported torch and the rest, opened the image store and made the
split; each worker is a fork of it, held on a pipe until the parent has created the studies,
then run in the same process image. A fork shares the parent's pages: `import torch` alone is
~500 MB of proportional set size per process here (279 MB of it anonymous: relocated CUDA
libraries, the operator registry), which spawned workers each paid again, with ~5 s of imports.
The fork happens before the parent opens any database connection, MLflow client or thread, and
before CUDA is touched (a CUDA context does not survive fork; each worker picks its device).

Spawned (`python -m workbench worker FILE --index I`, logs the same): other systems, and the
command another host runs to join a study.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np

from workbench import search, tracking
from workbench.config import StudyConfig
from workbench.cv import split_hparams
from workbench.data import V2_KEYS, ImageData, Split
from workbench.errors import WorkbenchError
from workbench.models import create_model
from workbench.runtime import FORK as FORK  # re-exported: the study forks its workers where true
from workbench.runtime import (
    configure_threads,
    release_file_pages,
    select_device,
    trim_memory,
)
from workbench.tracking import DataRef, Tracker
from workbench.train import EVAL_BATCH, Interrupted, fit


def work(cfg: StudyConfig, data: ImageData, split: Split, index: int) -> int:
    """One worker's search, in this process; returns its exit code (0, 130 Ctrl-C, 2, 1)."""
    configure_threads(1)
    stop: list[bool] = []
    signal.signal(signal.SIGINT, lambda s, f: stop.append(True))  # finish the epoch, then stop
    try:
        search.run_worker(
            cfg,
            data,
            split,
            Tracker(cfg, data=DataRef.of(data, split)),
            worker=index,
            should_stop=lambda: bool(stop),
        )
        return 0
    except Interrupted as e:
        print(f"worker {index}: {e}", flush=True)
        return 130
    except WorkbenchError as e:  # one line, unwrapped (a log is no terminal): the parent shows it
        print(f"error: {' '.join(str(e).split())}", flush=True)
        return 2
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


class Forked:
    """A worker forked from this process, waiting on a pipe until `start`."""

    def __init__(self, pid: int, go: int) -> None:
        self.pid, self._go, self.started = pid, go, False
        self.returncode: int | None = None

    def start(self) -> None:
        os.write(self._go, b"1")
        os.close(self._go)
        self._go, self.started = -1, True

    def close(self) -> None:
        """Let go of the pipe: a worker not started reads its end, exits with 0, is reaped."""
        if self._go >= 0:
            os.close(self._go)
            self._go = -1
            self.wait()

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def fork_workers(
    cfg: StudyConfig, data: ImageData, split: Split, n: int, logs: Path
) -> list[Forked]:
    """n workers forked now, each held until its `start` (or let go by `close`)."""
    logs.mkdir(parents=True, exist_ok=True)
    _warm_up(cfg, data)
    gc.collect()
    trim_memory()  # what decoding and the warm-up freed: not inherited by every worker
    release_file_pages()  # library pages only the loader used: mapped in no worker (~250 MB)
    gc.freeze()  # the collector leaves the objects made so far alone: their pages stay shared
    workers: list[Forked] = []
    for i in range(n):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(write)
                for w in workers:  # the earlier workers' pipes: theirs, not ours to hold open
                    os.close(w._go)
                code = _held(cfg, data, split, i, read, logs / f"worker-{i}.log")
            finally:
                os._exit(code)  # never the parent's atexit handlers or finalisers
        os.close(read)
        workers.append(Forked(pid, write))
    return workers


def _warm_up(cfg: StudyConfig, data: ImageData) -> None:
    """Make, before forking, what every worker would otherwise make in its first trial, so that
    the workers share one copy:
    - imports: an optimizer imports torch._dynamo (+113 MB PSS here), a resnet or a v2
      augmentation torchvision (+280 MB, 3 s);
    - oneDNN's kernels for the study's shapes: one training step of each model, with its fixed
      hyperparameters, at its batch size, then one inference batch. A worker that made them in
      its first step placed their small, long-lived blocks between that step's activations,
      and the blocks split its heap (a malloc trace of one fold: blocks of 32-104 bytes held
      the heap 53 MB above where it started, between 8 MB activations). Bench item 7's peak,
      3 runs each: 952-971 MB without this step, 924-930 MB with it. It costs one step of each
      model (0.1 s for that cnn); a trial of other shapes makes its own kernels.
    Workers that train on a GPU run no oneDNN kernels: for them two images do (the imports), and
    the parent still leaves CUDA uninitialised (the model stays on the CPU)."""
    on_cpu = select_device(cfg.device).type == "cpu"  # asks NVML only: CUDA stays untouched
    n = len(data.y)
    for name, spec in cfg.models.items():
        model_hp, train_cfg, augment = split_hparams(cfg, name, dict(spec.params))
        net = create_model(spec.arch or name, data.num_classes, data.in_shape, **model_hp)
        batch = data.rows(np.arange(min(train_cfg.batch_size if on_cpu else 2, n)))
        scored = data.rows(np.arange(min(EVAL_BATCH if on_cpu else 2, n)))
        # fit builds this model's per-image pipeline and batch mixer: their imports are made
        fit(net, batch, scored, train_cfg.model_copy(update={"epochs": 1}), augment=augment)
        if V2_KEYS & set(spec.space):  # searched: the pipeline above may have had no v2 step
            import torchvision.transforms.v2  # noqa: F401
    tracking.preload(cfg)  # MLflow's client: 2.5 s and 74 MB a worker otherwise
    search.preload(cfg)  # alembic, the ORM models, the dialect: 20 MB a process otherwise


def _held(cfg: StudyConfig, data: ImageData, split: Split, index: int, go: int, log: Path) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides while we wait
    started = os.read(go, 1)
    os.close(go)
    if not started:  # the parent let go: nothing to run, or it stopped
        return 0
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    return work(cfg, data, split, index)


class Spawned:
    """A `python -m workbench worker` process, started by `start`."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv, self.log = argv, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                self.argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )

    def close(self) -> None:
        pass

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def wait(self) -> int:
        return 0 if self.proc is None else self.proc.wait()

    def send_signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()


def spawn_workers(
    file: Path, data: str | None, trials: int | None, n: int, logs: Path
) -> list[Spawned]:
    logs.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "workbench", "worker", str(file)]
    argv += ["--data", data] if data else []
    argv += ["--trials", str(trials)] if trials else []
    return [Spawned([*argv, "--index", str(i)], logs / f"worker-{i}.log") for i in range(n)]
