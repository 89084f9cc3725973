"""The results: a rich table on the terminal, reports/bench/bench.json and bench.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench.common import ItemResult

VERDICT_STYLE = {"PASS": "green", "MISS": "bold red", "": ""}


def table(items: list[ItemResult], machine: dict[str, Any], mode: str) -> Table:
    t = Table(
        title=f"workbench bench ({mode})",
        caption=(
            f"{machine['cores']} cores ({machine['cpu']}), torch {machine['torch']}, "
            f"{machine['date']}, commit {machine['commit']}"
        ),
    )
    for col, justify in (
        ("item", "right"),
        ("figure", "left"),
        ("value", "right"),
        ("target", "right"),
        ("", "left"),
        ("note", "left"),
    ):
        t.add_column(col, justify=justify)  # type: ignore[arg-type]
    for item in items:
        t.add_section()
        title = escape(item.title.split(":")[0])
        took = f"item took {item.seconds:.0f} s"
        t.add_row(str(item.item), f"[bold]{title}[/]", "", "", "", took)
        if "error" in item.details:
            first = escape(item.details["error"].splitlines()[0])
            t.add_row("", "[red]failed[/]", "", "", "", first)
        for f in item.figures:
            v = f"[{VERDICT_STYLE[f.verdict]}]{f.verdict}[/]" if f.verdict else ""
            t.add_row("", escape(f.name), f.shown(), f.target, v, escape(f.note))
    return t


QUICK_NOTE = "`--quick`: every size shrunk to seconds; it checks the bench runs, not workbench."


def markdown(
    items: list[ItemResult], machine: dict[str, Any], mode: str, total_s: float, end_load: float
) -> str:
    lines = [
        f"# workbench bench ({mode})",
        "",
        f"{machine['date']} · {machine['cores']} cores ({machine['cpu']}) · torch "
        f"{machine['torch']} · 1 torch thread per process · commit {machine['commit']} · "
        f"1-min load average {machine['loadavg_1min_at_start']} at start, {end_load} at end "
        f"(the bench itself adds 1 to 2; more means other work ran beside it) · "
        f"total {total_s:.0f} s",
        "",
        *([QUICK_NOTE, ""] if mode == "quick" else []),
        "| item | figure | value | target | verdict | note |",
        "|---:|---|---:|---:|---|---|",
    ]
    for item in items:
        for f in item.figures:
            lines.append(
                f"| {item.item} | {f.name} | {f.shown()} | {f.target} | {f.verdict} | {f.note} |"
            )
    for item in items:
        lines += [
            "",
            f"## {item.item}. {item.title}",
            "",
            f"*{item.machine}; {item.seconds:.0f} s*",
        ]
        lines += [""] + [f"- {s}" for s in item.setup]
        if "error" in item.details:
            lines += ["", "```", item.details["error"], "```"]
    return "\n".join(lines) + "\n"


def write(
    folder: Path,
    items: list[ItemResult],
    machine: dict[str, Any],
    mode: str,
    total_s: float,
    extra: dict[str, Any],
) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    doc = {
        "machine": machine,
        "mode": mode,
        "total_seconds": round(total_s, 1),
        **extra,
        "items": [i.to_json() for i in items],
    }
    js, md = folder / "bench.json", folder / "bench.md"
    js.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    md.write_text(markdown(items, machine, mode, total_s, extra["loadavg_1min_at_end"]))
    return js, md


def show(items: list[ItemResult], machine: dict[str, Any], mode: str) -> None:
    console = Console()
    if not console.is_terminal:  # piped or in make's log: do not squeeze into 80 columns
        console = Console(width=160)
    console.print(table(items, machine, mode))
