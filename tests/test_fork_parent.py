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


def test_release_file_pages_unmaps_clean_library_pages_and_keeps_copied_ones(
    tmp_path: Path,
) -> None:
    # what the parent does before it forks: the pages that loading torch touched (its libraries'
    # code and constants) are unmapped, the model still computes the same, a clean read-only
    # file mapping maps again from its file, and a mapping with a copied (written) page is kept
    data = tmp_path / "pages.bin"
    data.write_bytes(bytes(range(256)) * 8192)  # 2 MiB, byte i = i % 256
    seen = run_python(
        f"""
        import ctypes, json, mmap
        import numpy
        import torch
        from workbench.models import create_model
        from workbench.runtime import release_file_pages

        def pss_file_mb():  # the kernel's own sum over this process's file-backed pages
            for line in open("/proc/self/smaps_rollup"):
                if line.startswith("Pss_File:"):
                    return int(line.split()[1]) / 1024

        def resident_kb(address):  # Rss of the mapping that holds `address`
            lines = open("/proc/self/smaps").read().splitlines()
            for i, line in enumerate(lines):
                lo, _, hi = line.split()[0].partition("-")
                if hi and not lo.endswith(":") and int(lo, 16) <= address < int(hi, 16):
                    rss = next(x for x in lines[i + 1 :] if x.startswith("Rss:"))
                    return int(rss.split()[1])

        torch.manual_seed(0)
        net = create_model("cnn", 3, (3, 16, 16), width=8, depth=2).eval()
        x = torch.rand(4, 3, 16, 16)
        with torch.no_grad():
            before = net(x)
        f = open({str(data)!r}, "rb")
        clean = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
        copied = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE)
        copied_at = numpy.frombuffer(copied, dtype=numpy.uint8).ctypes.data
        copied[:] = clean[:]  # every page read, then copied on write
        copied[7] = 200  # the file holds 7 there
        libc = ctypes.CDLL(None)
        assert libc.mprotect(ctypes.c_void_p(copied_at), len(copied), mmap.PROT_READ) == 0
        clean_sum = sum(clean[:])  # every page of the clean mapping read: resident
        clean_at = numpy.frombuffer(clean, dtype=numpy.uint8).ctypes.data
        kb = (resident_kb(clean_at), resident_kb(copied_at))
        pss = pss_file_mb()
        released = release_file_pages()
        pss_after = pss_file_mb()
        kb_after = (resident_kb(clean_at), resident_kb(copied_at))
        with torch.no_grad():
            after = net(x)
        print(json.dumps({{
            "released_mb": released / 2**20, "pss": pss, "pss_after": pss_after,
            "kb": kb, "kb_after": kb_after, "same": bool(torch.equal(before, after)),
            "clean_sum": clean_sum, "clean_again": sum(clean[:]), "copied_7": copied[7],
        }}))
        """
    )
    assert seen["same"] is True  # the code unmapped ran again from the page cache
    assert seen["kb"] == [2048, 2048]  # both mappings wholly resident before
    assert seen["kb_after"] == [0, 2048]  # the clean one unmapped; the copied one kept whole
    assert seen["copied_7"] == 200  # its written byte survives (dropping it would give 7)
    assert seen["clean_again"] == seen["clean_sum"] == 255 * 256 // 2 * 8192
    assert seen["released_mb"] > 2  # the clean mapping and torch's loader pages at least
    assert seen["pss_after"] < seen["pss"] / 2  # most file-backed pages were the loader's
