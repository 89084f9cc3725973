"""The worker processes of a search, and the live progress table while they run."""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence
from types import FrameType

import typer
from rich.live import Live

from workbench import search
from workbench.cli.processes import Forked, Spawned
from workbench.config import StudyConfig
from workbench.console import console, progress_table
from workbench.store import RunStore

Worker = Forked | Spawned


def run_workers(cfg: StudyConfig, procs: Sequence[Worker], storage: search.RDBStorage) -> bool:
    """Start the workers and show progress until they end; True if Ctrl-C stopped them."""
    n = len(procs)
    rows = search.progress(cfg, storage)
    if all(r.complete + r.pruned >= r.target for r in rows) and not search.pending_snapshots(
        cfg, storage
    ):
        console.print(
            "every model study is complete: nothing to run "
            "(raise `trials` in the study file, or pass --trials, to search further)"
        )
        return False
    logs = RunStore(cfg.out).logs
    for p in procs:
        p.start()
    stopping: list[bool] = []

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        if stopping:  # a second Ctrl-C: stop now
            for p in procs:
                p.kill()
        stopping.append(True)
        for p in procs:  # a Ctrl-C in the terminal reaches them too; this covers `kill -INT`
            if p.poll() is None:
                p.send_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGINT, on_sigint)
    started = time.time()
    try:
        with Live(console=console, refresh_per_second=1, transient=False) as live:
            while any(p.poll() is None for p in procs):
                live.update(
                    progress_table(search.progress(cfg, storage), cfg.cv.metric, n, started)
                )
                _wait_a_second(procs)
            live.update(progress_table(search.progress(cfg, storage), cfg.cv.metric, n, started))
    finally:
        signal.signal(signal.SIGINT, previous)
    bad = [i for i, p in enumerate(procs) if p.returncode not in (0, 130)]
    for i in bad:
        tail = (logs / f"worker-{i}.log").read_text().strip().splitlines()[-15:]
        console.print(
            f"[red]worker {i} exited with {procs[i].returncode}[/]; "
            f"last lines of {logs / f'worker-{i}.log'}:\n" + "\n".join(tail)
        )
    rows = search.progress(cfg, storage)
    if bad and not stopping and any(r.complete + r.pruned < r.target for r in rows):
        raise typer.Exit(1)  # a worker died and the others could not finish its share
    return bool(stopping)


def _wait_a_second(procs: Sequence[Worker]) -> None:
    """Up to 1 s between table refreshes, ending within 0.1 s of the last worker's exit (a
    1-s sleep added 0.5 s on average to every search stage)."""
    for _ in range(10):
        if all(p.poll() is not None for p in procs):
            return
        time.sleep(0.1)
