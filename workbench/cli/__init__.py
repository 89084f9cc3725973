"""The command line, and the only place where the stages are wired together.

workbench study FILE [--data PATH] [--trials N] [--workers N]   search, ensemble, report
workbench check FILE [--data PATH] [--trials N]                 preflight checks and the plan
workbench worker FILE [--data PATH] [--index I]                 join a running search
workbench ensemble FILE / workbench report FILE                 one stage, on stored studies
workbench predict FILE IMAGES... [--out TABLE]                  the final model on new images
"""

from workbench.cli.commands import app, main, prepare

__all__ = ["app", "main", "prepare"]
