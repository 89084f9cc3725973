"""The worker processes of a search, and the live progress table while they run."""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import typer
from rich.live import Live
from rich.markup import escape

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
    if all(r.complete + r.pruned >= r.target for r in rows) and not search.pending_followups(
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
        if not console.is_terminal:  # Live ends the table's last line only in a terminal
            console.line()
    finally:
        signal.signal(signal.SIGINT, previous)
    bad = [i for i, p in enumerate(procs) if p.returncode not in (0, 130)]
    for i in bad:
        _why(i, procs[i].returncode, logs / f"worker-{i}.log")
    rows = search.progress(cfg, storage)
    if bad and not stopping and any(r.complete + r.pruned < r.target for r in rows):
        raise typer.Exit(1)  # a worker died and the others could not finish its share
    return bool(stopping)


def _why(index: int, code: int | None, log: Path) -> None:
    """Why a worker ended: its one error line (exit 2: it stopped on purpose, e.g. trial after
    trial failed), else the last lines of its log (a traceback)."""
    lines = log.read_text().strip().splitlines() if log.exists() else []
    said = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    if code == 2 and said:
        console.print(
            f"[red]worker {index} stopped:[/] {escape(said[-1])} (log: {log})",
            soft_wrap=True,
            highlight=False,
        )
        return
    console.print(
        f"[red]worker {index} exited with {code}[/]; last lines of {log}:\n"
        + escape("\n".join(lines[-15:])),
        highlight=False,
    )


def _wait_a_second(procs: Sequence[Worker]) -> None:
    """Up to 1 s between table refreshes, ending within 0.1 s of the last worker's exit (a
    1-s sleep added 0.5 s on average to every search stage)."""
    for _ in range(10):
        if all(p.poll() is not None for p in procs):
            return
        time.sleep(0.1)
