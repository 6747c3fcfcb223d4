"""The benchmarks run as modules from the repository root (python3 -m bench.NAME): run by path they say so in
one line, and the command they record is the one that runs them again."""
from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from histo_retrieval import files

REPO = Path(__file__).resolve().parents[1]
# every bench/*.py that runs as a command (bench/timing.py is the benchmarks' shared helpers)
BENCH_MODULES = sorted(p.stem for p in (REPO / "bench").glob("*.py") if 'if __name__ == "__main__":' in p.read_text())


def test_every_benchmark_is_listed() -> None:
    assert BENCH_MODULES == ["archive_scale", "blas_kernels", "data_process_speed", "encoder_speed", "evaluate_memory", "evaluate_speed", "frozen_head",
                             "gpu", "index_speed", "loss_speed", "model_speed", "page_scale", "real_data", "run_all",
                             "search_speed", "serve", "slide_retrieval", "store_reads"]


@pytest.mark.parametrize("name", BENCH_MODULES)
def test_run_by_path_it_says_how_to_run_it(name: str, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO / "bench" / f"{name}.py"), "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"error: run it as a module, from the repository root: python3 -m bench.{name}\n"


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCH_MODULES)
def test_run_as_a_module_its_imports_resolve(name: str) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", f"bench.{name}", "--help"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: ")


@pytest.mark.parametrize("spec, argv, expected", [
    ("bench.serve", [str(REPO / "bench" / "serve.py"), "--quick"], ["-m", "bench.serve", "--quick"]),
    ("models.__main__", [str(REPO / "models" / "__main__.py"), "ABE_M"], ["-m", "models", "ABE_M"]),
    (None, ["train.py", "ABE_M", "MSLoss"], ["train.py", "ABE_M", "MSLoss"]),
])
def test_the_recorded_command_runs_it_again(monkeypatch: pytest.MonkeyPatch, spec: str | None, argv: list[str],
                                            expected: list[str]) -> None:
    main = types.ModuleType("__main__")
    main.__spec__ = importlib.machinery.ModuleSpec(spec, None) if spec else None
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", argv)
    python = os.path.basename(sys.executable)
    assert files.command_argv() == [python, *expected]
    assert files.command_line() == " ".join([python, *expected])
