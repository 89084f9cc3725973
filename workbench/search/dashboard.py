"""optuna-dashboard (Optuna's own web UI: history, parameter importance, intermediate values,
parallel coordinates) over a study file's storage, SQLite or PostgreSQL, as `make dashboard`
starts it. It serves every study of the storage; `study_urls` names the study file's own.
"""

from __future__ import annotations

from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from optuna.storages import RDBStorage

from workbench.config import StudyConfig
from workbench.errors import StorageError
from workbench.search.storage import missing_studies, shown_url, storage_url, study_name


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a page still loading does not hold up Ctrl-C


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # one line per request otherwise
        pass


def open_dashboard(cfg: StudyConfig, host: str, port: int) -> tuple[_Server, dict[str, str]]:
    """A dashboard server bound to host:port (not yet serving), and the URL of each model study
    of the study file (model -> URL). A StorageError when the storage lacks one: run it first."""
    import optuna_dashboard

    missing = missing_studies(cfg)
    if missing:
        raise StorageError(
            f"the storage {shown_url(storage_url(cfg))} holds no study {', '.join(missing)}: "
            f"run the study first (make study STUDY=...), or point search.storage (or "
            f"WORKBENCH_STORAGE) at the storage that holds it"
        )
    url = storage_url(cfg)
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    storage = RDBStorage(url, engine_kwargs=kwargs, skip_compatibility_check=True)
    try:
        server = make_server(
            host, port, optuna_dashboard.wsgi(storage), _Server, handler_class=_Quiet
        )
    except OSError as e:
        raise StorageError(
            f"cannot serve optuna-dashboard on {host}:{port} ({e.strerror or e}); "
            f"pick another port (make dashboard DASHBOARD_PORT=8081)"
        ) from None
    base = f"http://{host}:{server.server_port}/dashboard/studies"
    ids = {m: storage.get_study_id_from_name(study_name(cfg, m)) for m in cfg.models}
    return server, {m: f"{base}/{i}" for m, i in ids.items()}


def serve(server: _Server) -> None:
    """Serve until Ctrl-C, then close the socket."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
