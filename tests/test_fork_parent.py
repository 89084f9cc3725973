"""What a `workbench study` parent does before it forks its workers, checked in fresh processes:
it imports what opening the storage needs without connecting, and it keeps Triton's library out
when no GPU is visible. Both make the forked workers share pages instead of paying them again."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from workbench.config import StudyConfig


def run_python(code: str, env: dict[str, str] | None = None) -> dict[str, object]:
    """Run `code` in a fresh interpreter; it prints one JSON line, returned here."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_storage_preload_imports_what_opening_needs_and_connects_to_nothing(
    tiny_cfg: StudyConfig, tiny_file: Path
) -> None:
    db = tiny_cfg.out / "optuna.db"
    seen = run_python(
        f"""
        import json, sys
        from workbench import search
        from workbench.config import load_study
        cfg = load_study({str(tiny_file)!r})
        search.preload(cfg)
        from pathlib import Path
        made = Path({str(db)!r}).exists()
        before = set(sys.modules)
        search.open_storage(cfg)
        print(json.dumps({{"made": made, "new": sorted(set(sys.modules) - before)}}))
        """
    )
    assert seen["made"] is False  # no database file: nothing was opened
    assert seen["new"] == []  # opening the storage afterwards imports nothing more
    assert db.exists()


TRAIN_ONE_STEP = """
        import json, sys
        {first}
        import torch
        from torch.utils._triton import has_triton
        from workbench.models import create_model
        net = create_model("cnn", 3, (3, 8, 8), width=4, depth=1)
        optimizer = torch.optim.AdamW(net.parameters())  # imports torch._dynamo
        net(torch.rand(4, 3, 8, 8)).sum().backward()
        optimizer.step()
        maps = open("/proc/self/maps").read()
        print(json.dumps({
            "dynamo": "torch._dynamo" in sys.modules,
            "triton_library": "libtriton" in maps,
            "has_triton": has_triton(),
        }))
        """


def test_no_triton_without_a_gpu_and_training_still_runs() -> None:
    no_gpu = {"CUDA_VISIBLE_DEVICES": ""}  # no GPU visible, on any machine
    seen = run_python(TRAIN_ONE_STEP.replace("{first}", "import workbench.cli"), no_gpu)
    assert seen == {"dynamo": True, "triton_library": False, "has_triton": False}
    # the control: without the CLI's first import, torch._dynamo loads Triton where it is
    # installed (the CUDA build of torch brings it)
    plain = run_python(TRAIN_ONE_STEP.replace("{first}", "pass"), no_gpu)
    installed = importlib.util.find_spec("triton") is not None
    assert plain["triton_library"] is installed


def test_a_search_worker_never_imports_scikit_learn_scipy_or_pandas(tiny_file: Path) -> None:
    # they are ~100 MB of heap and libraries (bench item 7): a search process needs none of them,
    # so the parent does not import them before it forks; the ensemble stage does, after
    from workbench.cli.commands import prepare

    prepare(tiny_file, None, None)  # decodes the digits into the image store (scikit-learn's)
    seen = run_python(
        f"""
        import json, sys
        from workbench.cli.commands import prepare
        from workbench.cli.processes import _warm_up
        from workbench import search
        from workbench.tracking import Tracker
        cfg, data, split = prepare({str(tiny_file)!r}, None, None)
        _warm_up(cfg, data)
        storage = search.open_storage(cfg)
        search.create_studies(cfg, storage)
        search.run_worker(cfg, data, split, Tracker(cfg, enabled=False))
        done = len(search.completed_trials(cfg, "mlp", storage))
        heavy = ("sklearn", "scipy", "pandas", "pyarrow")
        searched = sorted(m for m in heavy if m in sys.modules)
        from workbench.cli.stages import ensemble_stage
        ensemble_stage(cfg, data, split, Tracker(cfg, enabled=False))
        ensembled = sorted(m for m in ("sklearn", "scipy") if m in sys.modules)
        print(json.dumps({{"done": done, "searched": searched, "ensembled": ensembled}}))
        """
    )
    assert seen["done"] >= 1  # trials ran, folds and scores included
    assert seen["searched"] == []
    assert seen["ensembled"] == ["scipy", "sklearn"]  # the control: the combiners need them
