"""The command line, and the only place where the stages are wired together.

workbench study FILE [--data PATH] [--trials N] [--workers N]   search, ensemble, report
workbench check FILE [--data PATH] [--trials N]                 preflight checks and the plan
workbench worker FILE [--data PATH] [--index I]                 join a running search
workbench ensemble FILE / workbench report FILE                 one stage, on stored studies
workbench predict FILE IMAGES... / workbench export FILE --onnx P  use the final model
workbench dashboard FILE [--port P]                             optuna-dashboard on the storage
"""

from workbench.runtime import skip_triton_without_gpu

skip_triton_without_gpu()  # before the imports below bring in torch._dynamo (and with it Triton)

from workbench.cli import dashboard, use  # noqa: E402, F401  (register their commands)
from workbench.cli.commands import app, main, prepare  # noqa: E402

__all__ = ["app", "main", "prepare"]
