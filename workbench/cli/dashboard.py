"""`workbench dashboard FILE`: optuna-dashboard on the study's storage (`make dashboard`).

workbench dashboard FILE [--host 127.0.0.1] [--port 8080]   serve until Ctrl-C

It reads the study file only (no data, no preflight): the storage is SQLite in the output folder
by default, or `search.storage` / WORKBENCH_STORAGE (a PostgreSQL URL). It prints the dashboard's
URL and each model study's page, then serves every study of the storage.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from workbench.cli.commands import StudyFile, _fail, app
from workbench.config import load_study
from workbench.console import console
from workbench.errors import WorkbenchError
from workbench.search import dashboard, shown_url, storage_url

HostOpt = Annotated[str, typer.Option(help="address to listen on (0.0.0.0: every interface)")]
PortOpt = Annotated[int, typer.Option(min=0, max=65535, help="port to listen on (0: any free)")]


@app.command("dashboard")
def dashboard_command(file: StudyFile, host: HostOpt = "127.0.0.1", port: PortOpt = 8080) -> None:
    """Serve optuna-dashboard on the study's storage: trials, importances, intermediate values."""
    try:
        cfg = load_study(file)
        server, urls = dashboard.open_dashboard(cfg, host, port)
    except WorkbenchError as e:
        raise _fail(e) from None
    where = shown_url(storage_url(cfg))
    console.print(
        escape(f"optuna-dashboard on {where}: http://{host}:{server.server_port}/dashboard"),
        highlight=False,
    )
    for model, url in urls.items():
        console.print(escape(f"  {cfg.name}/{model}: {url}"), highlight=False)
    console.print("Ctrl-C stops it.", highlight=False)
    dashboard.serve(server)
